//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
//!
//! Two jobs: the reset line (command 0xFE, how Linux reboots with `reboot=k`) ends the VM
//! with the reboot exit code, and Ctrl-Alt-Del can be typed into the guest so SIGTERM
//! asks it to shut down. To make the second one work the guest's i8042 and atkbd drivers
//! must attach, so the controller answers the probe commands Linux sends (self tests,
//! command byte, keyboard identify). Answering every command that expects a reply
//! matters: a missing reply costs the guest a half-second timeout per command. There is
//! no mouse: the AUX port answers its loopback test but NAKs every byte sent to it.
//!
//! vm-superio's `I8042Device` only implements the reset command, hence this device.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::{ExitReason, VmControl};
use crate::devices::IrqLine;

/// Base port; the device claims 0x60..=0x64 and answers offsets 0 and 4 (0x61 is
/// KVM's in-kernel speaker port and never reaches us).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
pub const KBD_IRQ: u32 = 1;
pub const AUX_IRQ: u32 = 12;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

// Status register bits.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Set = keyboard not inhibited by the key lock.
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUXDATA: u8 = 0x20;

// Controller configuration byte ("command byte") bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET: u8 = 0xfe;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_NAK: u8 = 0xfe;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Bytes the controller holds for the guest; real ones hold one, a few more lets a
/// whole key sequence be queued at once.
const BUFFER_LIMIT: usize = 16;

/// Ctrl, Alt, Del pressed, then released: scan code set 1 (what the guest sees when the
/// controller translates, the Linux default) and set 2 (untranslated).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

pub struct I8042 {
    ctr: u8,
    /// Pending output bytes; `true` marks AUX (mouse) data.
    output: VecDeque<(u8, bool)>,
    /// Last byte handed out, returned again when the buffer is read empty.
    last: u8,
    /// Controller command waiting for its data byte.
    pending_command: Option<u8>,
    /// Keyboard command waiting for its parameter byte.
    pending_kbd_command: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    last_write_was_command: bool,
    kbd_irq: IrqLine,
    aux_irq: IrqLine,
    control: Arc<VmControl>,
}

impl I8042 {
    pub fn new(kbd_irq: IrqLine, aux_irq: IrqLine, control: Arc<VmControl>) -> Self {
        I8042 {
            // What a BIOS leaves behind: keyboard interrupt on, POST passed, translation.
            ctr: CTR_KBDINT | CTR_SYS | CTR_XLATE,
            output: VecDeque::new(),
            last: 0,
            pending_command: None,
            pending_kbd_command: None,
            last_write_was_command: false,
            kbd_irq,
            aux_irq,
            control,
        }
    }

    pub fn kbd_irq(&self) -> &IrqLine {
        &self.kbd_irq
    }

    pub fn aux_irq(&self) -> &IrqLine {
        &self.aux_irq
    }

    /// Types Ctrl-Alt-Del: how a guest is asked to shut down or reboot.
    pub fn inject_ctrl_alt_del(&mut self) {
        if self.ctr & CTR_XLATE != 0 {
            CTRL_ALT_DEL_SET1.iter().for_each(|&b| self.push(b, false));
        } else {
            CTRL_ALT_DEL_SET2.iter().for_each(|&b| self.push(b, false));
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if let Some(&(_, aux)) = self.output.front() {
            s |= STATUS_OBF;
            if aux {
                s |= STATUS_AUXDATA;
            }
        }
        if self.ctr & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_write_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() >= BUFFER_LIMIT {
            return;
        }
        self.output.push_back((byte, aux));
        if self.output.len() == 1 {
            self.raise_irq_for_head();
        }
    }

    /// One interrupt per byte that reaches the head of the buffer, if the guest enabled
    /// interrupts for that port.
    fn raise_irq_for_head(&self) {
        let Some(&(_, aux)) = self.output.front() else {
            return;
        };
        let (enabled, line) = if aux {
            (self.ctr & CTR_AUXINT != 0, &self.aux_irq)
        } else {
            (self.ctr & CTR_KBDINT != 0, &self.kbd_irq)
        };
        if enabled && let Err(e) = line.pulse() {
            tracing::warn!("i8042: cannot raise IRQ {}: {e}", line.gsi());
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.output.pop_front() {
            self.last = byte;
            self.raise_irq_for_head();
        }
        self.last
    }

    fn command(&mut self, cmd: u8) {
        self.pending_command = None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, false),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT | CMD_WRITE_KBD_BUFFER | CMD_WRITE_AUX_BUFFER | CMD_WRITE_AUX => {
                self.pending_command = Some(cmd)
            }
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST | CMD_KBD_TEST => self.push(0x00, false),
            CMD_SELF_TEST => self.push(0x55, false),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_READ_INPUT => self.push(0x00, false),
            // Output port: bit 0 = not in reset, bit 1 = A20 enabled.
            CMD_READ_OUTPUT => self.push(0x03, false),
            // 0xF0..=0xFF pulse output port lines low; bit 0 low pulses CPU reset, and
            // 0xFE is the usual way to ask for it.
            c if c == CMD_RESET || (c >= 0xf0 && c & 1 == 0) => {
                tracing::debug!("i8042: reset command {c:#x}");
                self.control.request_exit(ExitReason::Reboot);
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT) => {
                if value & 1 == 0 {
                    self.control.request_exit(ExitReason::Reboot);
                }
            }
            Some(CMD_WRITE_KBD_BUFFER) => self.push(value, false),
            Some(CMD_WRITE_AUX_BUFFER) => self.push(value, true),
            // No mouse behind the AUX port: refuse whatever is sent to it.
            Some(CMD_WRITE_AUX) => self.push(KBD_NAK, true),
            _ => self.keyboard(value),
        }
    }

    /// A byte sent to the keyboard itself.
    fn keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.pending_kbd_command.take() {
            self.push(KBD_ACK, false);
            // "Get scan code set" (0xF0 with parameter 0) answers the current set.
            if cmd == 0xf0 && value == 0 {
                self.push(0x02, false);
            }
            return;
        }
        match value {
            0xff => {
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_OK, false);
            }
            // Identify: an MF2 keyboard.
            0xf2 => {
                self.push(KBD_ACK, false);
                self.push(0xab, false);
                self.push(0x83, false);
            }
            0xee => self.push(0xee, false),
            // Set LEDs, scan code set, typematic rate: a parameter byte follows.
            0xed | 0xf0 | 0xf3 => {
                self.pending_kbd_command = Some(value);
                self.push(KBD_ACK, false);
            }
            _ => self.push(KBD_ACK, false),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => self.read_data(),
            OFFSET_COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFFSET_DATA => {
                self.last_write_was_command = false;
                self.data(value);
            }
            OFFSET_COMMAND => {
                self.last_write_was_command = true;
                self.command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, Arc<VmControl>) {
        let control = Arc::new(VmControl::new().unwrap());
        let dev = I8042::new(
            IrqLine::new(KBD_IRQ).unwrap(),
            IrqLine::new(AUX_IRQ).unwrap(),
            control.clone(),
        );
        (dev, control)
    }

    fn out(d: &mut I8042, offset: u64, v: u8) {
        d.write(offset, &[v]);
    }
    fn inb(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }
    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut v = Vec::new();
        while inb(d, 4) & STATUS_OBF != 0 {
            v.push(inb(d, 0));
        }
        v
    }

    #[test]
    fn reset_command_requests_reboot() {
        let (mut d, control) = device();
        out(&mut d, 4, 0xaa);
        assert!(!control.is_stopping());
        out(&mut d, 4, CMD_RESET);
        assert_eq!(control.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn answers_linux_probe_sequence() {
        let (mut d, control) = device();
        out(&mut d, 4, CMD_SELF_TEST);
        assert_eq!(drain(&mut d), vec![0x55]);
        out(&mut d, 4, CMD_READ_CTR);
        let ctr = drain(&mut d)[0];
        assert_eq!(ctr & CTR_XLATE, CTR_XLATE);
        out(&mut d, 4, CMD_WRITE_CTR);
        out(&mut d, 0, ctr | CTR_AUXINT);
        out(&mut d, 4, CMD_READ_CTR);
        assert_eq!(drain(&mut d), vec![ctr | CTR_AUXINT]);
        // AUX loopback echoes with the AUX flag set.
        out(&mut d, 4, CMD_WRITE_AUX_BUFFER);
        out(&mut d, 0, 0x5a);
        assert_eq!(inb(&mut d, 4) & STATUS_AUXDATA, STATUS_AUXDATA);
        assert_eq!(drain(&mut d), vec![0x5a]);
        out(&mut d, 0, 0xf2);
        assert_eq!(drain(&mut d), vec![KBD_ACK, 0xab, 0x83]);
        out(&mut d, 0, 0xed);
        out(&mut d, 0, 0x07);
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK]);
        assert!(kbd_irq_count(&d) > 0);
        assert!(!control.is_stopping());
    }

    fn kbd_irq_count(d: &I8042) -> u64 {
        d.kbd_irq().eventfd().read().unwrap_or(0)
    }

    #[test]
    fn ctrl_alt_del_follows_translation_mode() {
        let (mut d, _) = device();
        d.inject_ctrl_alt_del();
        assert_eq!(drain(&mut d), CTRL_ALT_DEL_SET1.to_vec());
        out(&mut d, 4, CMD_WRITE_CTR);
        out(&mut d, 0, CTR_KBDINT);
        d.inject_ctrl_alt_del();
        assert_eq!(drain(&mut d), CTRL_ALT_DEL_SET2.to_vec());
    }
}
