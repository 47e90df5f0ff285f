//! A virtio-mmio driver for tiny test guests, as iced-x86 code: feature negotiation
//! through the registers, split rings built in guest memory, requests, polling the used
//! ring. Interrupts stay off: the guest polls (it runs at ~1.7 M instructions/s under
//! PVM, so everything here is a handful of instructions per step).
//!
//! Register convention: RBX = the device's MMIO base, R15 = the number of the step that
//! is running (printed by the failure path), DX = COM1.

use iced_x86::code_asm::*;

use super::{halt_forever, i8042_reset, print};

/// Where keel-vmm puts virtio device number `n` (vmm/src/boot/layout.rs).
pub fn mmio_base(n: u64) -> u64 {
    0xd000_0000 + n * 0x1000
}

pub const REG_MAGIC: i32 = 0x00;
pub const REG_DEVICE_ID: i32 = 0x08;
pub const REG_DEVICE_FEATURES: i32 = 0x10;
pub const REG_DEVICE_FEATURES_SEL: i32 = 0x14;
pub const REG_DRIVER_FEATURES: i32 = 0x20;
pub const REG_DRIVER_FEATURES_SEL: i32 = 0x24;
pub const REG_QUEUE_SEL: i32 = 0x30;
pub const REG_QUEUE_NUM_MAX: i32 = 0x34;
pub const REG_QUEUE_NUM: i32 = 0x38;
pub const REG_QUEUE_READY: i32 = 0x44;
pub const REG_QUEUE_NOTIFY: i32 = 0x50;
pub const REG_STATUS: i32 = 0x70;
pub const REG_QUEUE_DESC_LOW: i32 = 0x80;
pub const REG_QUEUE_DESC_HIGH: i32 = 0x84;
pub const REG_QUEUE_AVAIL_LOW: i32 = 0x90;
pub const REG_QUEUE_AVAIL_HIGH: i32 = 0x94;
pub const REG_QUEUE_USED_LOW: i32 = 0xa0;
pub const REG_QUEUE_USED_HIGH: i32 = 0xa4;
pub const REG_CONFIG: i32 = 0x100;

pub const F_NEXT: u32 = 1;
pub const F_WRITE: u32 = 2;

/// A queue's rings in guest memory (all below 4 GiB, identity mapped).
#[derive(Clone, Copy)]
pub struct Ring {
    pub desc: u32,
    pub avail: u32,
    pub used: u32,
    pub size: u32,
}

impl Ring {
    /// Rings for a queue of `size` at `base`: descriptors, avail at +0x1000, used at +0x2000.
    pub fn at(base: u32, size: u32) -> Ring {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
        }
    }
}

/// The guest-side driver being assembled.
pub struct Driver {
    pub a: CodeAssembler,
    fail: CodeLabel,
}

impl Driver {
    /// Starts a guest for the device at `base`: sets up RBX and DX.
    pub fn new(base: u64) -> Driver {
        let mut a = super::asm64();
        let fail = a.create_label();
        a.mov(rbx, base).unwrap();
        super::serial_setup(&mut a);
        Driver { a, fail }
    }

    pub fn step(&mut self, n: u32) {
        self.a.mov(r15d, n).unwrap();
    }

    pub fn write_reg(&mut self, reg: i32, value: u32) {
        self.a.mov(dword_ptr(rbx + reg), value).unwrap();
    }

    /// EAX = register.
    pub fn read_reg(&mut self, reg: i32) {
        self.a.mov(eax, dword_ptr(rbx + reg)).unwrap();
    }

    /// Fails unless EAX == value.
    pub fn expect_eax(&mut self, value: u32) {
        self.a.cmp(eax, value).unwrap();
        self.a.jne(self.fail).unwrap();
    }

    /// Fails unless EAX has all bits of `mask`.
    pub fn expect_bits(&mut self, mask: u32) {
        self.a.and(eax, mask).unwrap();
        self.a.cmp(eax, mask).unwrap();
        self.a.jne(self.fail).unwrap();
    }

    /// Checks the identity registers, then ACKNOWLEDGE, DRIVER, features (the 64-bit
    /// `features` must be offered), FEATURES_OK read back.
    pub fn negotiate(&mut self, device_id: u32, features: u64) {
        self.step(1);
        self.read_reg(REG_MAGIC);
        self.expect_eax(0x7472_6976);
        self.read_reg(REG_DEVICE_ID);
        self.expect_eax(device_id);
        self.write_reg(REG_STATUS, 0); // reset
        self.write_reg(REG_STATUS, 1); // ACKNOWLEDGE
        self.write_reg(REG_STATUS, 3); // DRIVER
        self.step(2);
        for sel in 0..2u32 {
            let want = (features >> (32 * sel)) as u32;
            self.write_reg(REG_DEVICE_FEATURES_SEL, sel);
            self.read_reg(REG_DEVICE_FEATURES);
            self.expect_bits(want);
            self.write_reg(REG_DRIVER_FEATURES_SEL, sel);
            self.write_reg(REG_DRIVER_FEATURES, want);
        }
        self.step(3);
        self.write_reg(REG_STATUS, 0xb); // FEATURES_OK
        self.read_reg(REG_STATUS);
        self.expect_bits(0x8);
    }

    /// Configures queue `index` with `ring` and marks it ready.
    pub fn setup_queue(&mut self, index: u32, ring: Ring) {
        self.step(10 + index);
        self.write_reg(REG_QUEUE_SEL, index);
        self.read_reg(REG_QUEUE_NUM_MAX);
        self.a.cmp(eax, ring.size).unwrap();
        self.a.jb(self.fail).unwrap();
        self.write_reg(REG_QUEUE_NUM, ring.size);
        self.write_reg(REG_QUEUE_DESC_LOW, ring.desc);
        self.write_reg(REG_QUEUE_DESC_HIGH, 0);
        self.write_reg(REG_QUEUE_AVAIL_LOW, ring.avail);
        self.write_reg(REG_QUEUE_AVAIL_HIGH, 0);
        self.write_reg(REG_QUEUE_USED_LOW, ring.used);
        self.write_reg(REG_QUEUE_USED_HIGH, 0);
        self.write_reg(REG_QUEUE_READY, 1);
    }

    /// DRIVER_OK, and checks the device did not answer NEEDS_RESET.
    pub fn driver_ok(&mut self) {
        self.step(20);
        self.write_reg(REG_STATUS, 0xf);
        self.read_reg(REG_STATUS);
        self.expect_eax(0xf);
    }

    /// Writes descriptor `index` of `ring`.
    pub fn desc(&mut self, ring: Ring, index: u32, addr: u32, len: u32, flags: u32, next: u32) {
        let at = (ring.desc + 16 * index) as u64;
        self.a.mov(dword_ptr(at), addr).unwrap();
        self.a.mov(dword_ptr(at + 4), 0u32).unwrap();
        self.a.mov(dword_ptr(at + 8), len).unwrap();
        self.a.mov(dword_ptr(at + 12), flags | (next << 16)).unwrap();
    }

    /// Puts `head` in avail slot `slot` and publishes avail idx = slot + 1, then notifies
    /// queue `queue`.
    pub fn submit(&mut self, ring: Ring, queue: u32, slot: u32, head: u32) {
        let entry = (ring.avail + 4 + 2 * (slot % ring.size)) as u64;
        self.a.mov(word_ptr(entry), head).unwrap();
        self.a.mov(word_ptr(ring.avail as u64 + 2), slot + 1).unwrap();
        self.a.mfence().unwrap();
        self.write_reg(REG_QUEUE_NOTIFY, queue);
    }

    /// Spins until the used ring's idx reaches `count`.
    pub fn wait_used(&mut self, ring: Ring, count: u32) {
        let mut spin = self.a.create_label();
        self.a.set_label(&mut spin).unwrap();
        self.a.pause().unwrap();
        self.a.movzx(eax, word_ptr(ring.used as u64 + 2)).unwrap();
        self.a.cmp(eax, count).unwrap();
        self.a.jb(spin).unwrap();
    }

    /// EAX = the length of used element `slot`.
    pub fn used_len(&mut self, ring: Ring, slot: u32) {
        let at = ring.used as u64 + 4 + 8 * u64::from(slot % ring.size) + 4;
        self.a.mov(eax, dword_ptr(at)).unwrap();
    }

    /// Prints `text`, resets through the i8042. The failure path prints
    /// `FAIL step N` and resets too.
    pub fn finish(mut self, text: &[u8]) -> Vec<u8> {
        print(&mut self.a, text);
        i8042_reset(&mut self.a);
        self.a.set_label(&mut self.fail).unwrap();
        print(&mut self.a, b"FAIL step ");
        // Two decimal digits of R15.
        self.a.mov(eax, r15d).unwrap();
        self.a.mov(ecx, 10u32).unwrap();
        self.a.xor(edx, edx).unwrap();
        self.a.div(ecx).unwrap();
        self.a.mov(ecx, edx).unwrap();
        self.a.mov(dx, super::COM1 as u32).unwrap();
        self.a.add(al, b'0' as u32).unwrap();
        self.a.out(dx, al).unwrap();
        self.a.mov(eax, ecx).unwrap();
        self.a.add(al, b'0' as u32).unwrap();
        self.a.out(dx, al).unwrap();
        print(&mut self.a, b"\n");
        i8042_reset(&mut self.a);
        halt_forever(&mut self.a);
        super::assemble(self.a, super::LOAD_ADDR)
    }

    pub fn fail_label(&self) -> CodeLabel {
        self.fail
    }
}
