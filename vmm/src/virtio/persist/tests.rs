//! Saving and restoring transports, no KVM: a device driven through its registers as a
//! guest would, saved, restored into a new transport and device over the same guest
//! memory, and driven on; and saved states the restore must refuse.

use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::bus::BusDevice;
use crate::device_counters::{DeviceCounters, DeviceKind};
use crate::devices::IrqLine;
use crate::virtio::Interrupt;
use crate::virtio::block::{Block, DiskConfig};
use crate::virtio::driver::{Buf, SplitRing};
use crate::virtio::mmio::CONFIG_OFFSET;
use crate::virtio::mmio::tests::{ALL_UP, Probe, negotiate, r, w};
use crate::virtio::rng::Rng;

const RING: u64 = 0x1_0000;
const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x8_1000;
const STATUS: u64 = 0x8_2000;
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;

fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn transport(device: Box<dyn VirtioDevice>, mem: &GuestMemory) -> MmioTransport {
    MmioTransport::new(device, mem.clone(), Interrupt::new(IrqLine::new(5).unwrap())).unwrap()
}

/// Queue `index` set up on `ring` through the registers, as a driver does.
fn program_queue(t: &mut MmioTransport, index: u32, ring: &SplitRing) {
    w(t, VIRTIO_MMIO_QUEUE_SEL, index);
    w(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(ring.size));
    for (low, high, addr) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, ring.desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, ring.avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, ring.used),
    ] {
        w(t, low, addr as u32);
        w(t, high, (addr >> 32) as u32);
    }
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

/// A driver's whole bring-up of a one-queue device on `ring`.
fn bring_up(t: &mut MmioTransport, ring: &SplitRing) {
    negotiate(t, FEATURES);
    program_queue(t, 0, ring);
    w(t, VIRTIO_MMIO_STATUS, ALL_UP);
    assert!(t.is_active());
}

fn notify(t: &mut MmioTransport) {
    t.handle_event(0, libc::EPOLLIN as u32);
}

fn used_idx(mem: &GuestMemory, ring: &SplitRing) -> u16 {
    mem.read_obj(GuestAddress(ring.used + 2)).unwrap()
}

/// A running virtio-rng with a 64-entry queue that served one request (unacked
/// interrupt), the feature selectors on their high halves and one config write.
fn running_rng(mem: &GuestMemory) -> (MmioTransport, SplitRing) {
    let mut t = transport(Box::<Rng>::default(), mem);
    let mut ring = SplitRing::new(mem, RING, 64);
    bring_up(&mut t, &ring);
    ring.add_chain(mem, &[Buf::w(DATA, 32)]);
    notify(&mut t);
    assert_eq!(ring.take_used(mem), vec![(0, 32)]);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    t.write(CONFIG_OFFSET, &[0]);
    (t, ring)
}

#[test]
fn transport_registers_survive_restore() {
    let mem = memory();
    let (old, ring) = running_rng(&mem);
    let saved = old.state();
    let mut t = transport(Box::<Rng>::default(), &mem);
    t.restore(&saved).unwrap();

    assert!(t.is_active(), "activated without the guest writing DRIVER_OK");
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_UP);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "high half selected: VERSION_1"
    );
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_USED_RING);
    assert_eq!(
        t.interrupt().line().eventfd().read().unwrap(),
        1,
        "unacked interrupt raised again"
    );
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    // QueueSel 0 is selected: its registers read back.
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), ring.desc as u32);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW), ring.avail as u32);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW), ring.used as u32);
    // QueueNum and DriverFeatures are write-only registers: the state says.
    let again = t.state();
    assert_eq!((again.queues[0].size, again.acked_features), (64, FEATURES));
    assert!(again.queues[0].event_idx_enabled);
    assert_eq!(again, saved, "restoring then saving gives back the same state");
    // The acked features are frozen as they were: DriverFeatures writes are ignored.
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    assert_eq!(t.state().acked_features, FEATURES);
    // One notification so the event loop looks at the queue again.
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    // The guest acknowledges and the interrupt is gone; a reset resets.
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_active());
}

#[test]
fn rng_requests_continue_after_restore() {
    let mem = memory();
    let (old, mut ring) = running_rng(&mem);
    let saved = old.state();
    drop(old);
    // The guest reuses the buffer: were the request served again, it would be filled.
    mem.write_slice(&[0; 32], GuestAddress(DATA)).unwrap();
    let mut t = transport(Box::<Rng>::default(), &mem);
    t.restore(&saved).unwrap();
    notify(&mut t);
    assert_eq!(ring.take_used(&mem), vec![], "the served request is not served again");
    let mut buf = [0xffu8; 32];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [0; 32]);
    let head = ring.add_chain(&mem, &[Buf::w(DATA, 16)]);
    notify(&mut t);
    assert_eq!(ring.take_used(&mem), vec![(head, 16)]);
    assert_eq!(used_idx(&mem, &ring), 2);
}

/// A 1 MiB disk image and the config that opens it.
fn disk() -> (tempfile::TempDir, DiskConfig) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let config = DiskConfig {
        path,
        readonly: false,
        serial: None,
        direct: false,
    };
    (dir, config)
}

/// One block request (header, optional data buffer, status) posted and served;
/// returns what the used ring says and the status byte.
fn block_request(
    t: &mut MmioTransport,
    mem: &GuestMemory,
    ring: &mut SplitRing,
    kind: u32,
    sector: u64,
    data: Buf,
) -> Vec<(u16, u32)> {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    ring.add_chain(mem, &[Buf::r(HDR, 16), data, Buf::w(STATUS, 1)]);
    notify(t);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_OK as u8);
    ring.take_used(mem)
}

#[test]
fn block_requests_continue_after_restore() {
    let (_dir, config) = disk();
    let mem = memory();
    let mut t = transport(Box::new(Block::open(&config).unwrap()), &mem);
    let mut ring = SplitRing::new(&mem, RING, 16);
    bring_up(&mut t, &ring);
    for sector in 0..3u8 {
        mem.write_slice(&[sector + 1; 512], GuestAddress(DATA)).unwrap();
        let used = block_request(
            &mut t,
            &mem,
            &mut ring,
            VIRTIO_BLK_T_OUT,
            sector.into(),
            Buf::r(DATA, 512),
        );
        assert_eq!(used.len(), 1);
    }
    assert_eq!(used_idx(&mem, &ring), 3);
    let saved = t.state();
    assert_eq!((saved.queues[0].next_avail, saved.queues[0].next_used), (3, 3));
    assert_eq!(
        saved.device,
        VirtioDeviceState::Block(BlockState { capacity_sectors: 2048 })
    );
    drop(t);

    // Through JSON, as a state file, into a disk opened again.
    let saved: VirtioTransportState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
    let counters = DeviceCounters::detached(DeviceKind::Block);
    let block = Block::open(&config).unwrap().with_counters(counters.clone());
    let mut t = transport(Box::new(block), &mem);
    t.restore(&saved).unwrap();
    notify(&mut t);
    assert_eq!(ring.take_used(&mem), vec![], "nothing is served twice");
    mem.write_slice(&[0; 512], GuestAddress(DATA)).unwrap();
    let used = block_request(&mut t, &mem, &mut ring, VIRTIO_BLK_T_IN, 1, Buf::w(DATA, 512));
    assert_eq!(
        used,
        vec![(9, 513)],
        "the fourth request, in the fourth chain's descriptors"
    );
    assert_eq!(used_idx(&mem, &ring), 4, "the used index goes on from 3");
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [2; 512], "sector 1 as the saved device wrote it");
    assert_ne!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & INT_USED_RING, 0);
    let mut on_disk = [0u8; 512];
    std::fs::File::open(&config.path)
        .unwrap()
        .read_exact_at(&mut on_disk, 2 * 512)
        .unwrap();
    assert_eq!(on_disk, [3; 512]);
    let served = counters.snapshot("virtio-blk0");
    assert_eq!(
        (served.ops_out, served.ops_in),
        (0, 1),
        "only the new request was served: {served:?}"
    );
}

#[test]
fn a_device_saved_during_setup_finishes_it_after_restore() {
    let mem = memory();
    let mut t = transport(Box::<Rng>::default(), &mem);
    let ring = SplitRing::new(&mem, RING, 16);
    negotiate(&mut t, FEATURES);
    program_queue(&mut t, 0, &ring);
    let saved = t.state();
    assert!(!saved.active);
    let mut t = transport(Box::<Rng>::default(), &mem);
    t.restore(&saved).unwrap();
    assert!(!t.is_active());
    assert_eq!(
        t.queue_evts()[0].read().ok(),
        None,
        "no notification for a device not running"
    );
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut t, VIRTIO_MMIO_STATUS, ALL_UP);
    assert!(t.is_active(), "the guest's DRIVER_OK activates it");
}

#[test]
fn needs_reset_is_carried() {
    let mem = memory();
    let mut t = transport(
        Box::new(Probe {
            fail_queue: true,
            ..Probe::default()
        }),
        &mem,
    );
    bring_up(&mut t, &SplitRing::new(&mem, RING, 16));
    notify(&mut t);
    let saved = t.state();
    assert!(saved.needs_reset && saved.active);
    let probe = Probe::default();
    let activated = probe.activated.clone();
    let mut t = transport(Box::new(probe), &mem);
    t.restore(&saved).unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_UP | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(*activated.lock().unwrap(), vec![FEATURES]);
    assert_eq!(t.queue_evts()[0].read().ok(), None, "a failed device is not notified");
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
}

/// Restores `state` into a fresh rng transport, expecting a refusal that leaves it so.
fn refused(mem: &GuestMemory, state: &VirtioTransportState) -> StateError {
    let mut t = transport(Box::<Rng>::default(), mem);
    let err = t.restore(state).expect_err("refused");
    assert!(!t.is_active());
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    err
}

fn is_invalid(e: &StateError) -> bool {
    matches!(e, StateError::Invalid { what: "virtio-rng", .. })
}
fn is_mismatch(e: &StateError) -> bool {
    matches!(e, StateError::Mismatch { what: "virtio-rng", .. })
}

#[test]
fn hostile_queue_states_are_refused() {
    let mem = memory();
    let good = running_rng(&mem).0.state();
    let with = |f: &dyn Fn(&mut QueueSavedState)| {
        let mut s = good.clone();
        f(&mut s.queues[0]);
        s
    };
    let cases: [(&str, VirtioTransportState); 6] = [
        ("size not a power of two", with(&|q| q.size = 12)),
        ("size past the maximum", with(&|q| q.size = 512)),
        ("size zero", with(&|q| q.size = 0)),
        (
            "next available past next used + size",
            with(&|q| q.next_avail = q.next_used.wrapping_add(65)),
        ),
        ("misaligned descriptor table", with(&|q| q.desc_table += 8)),
        ("used ring outside guest memory", with(&|q| q.used_ring = 0x10_0000)),
    ];
    for (why, state) in &cases {
        let e = refused(&mem, state);
        assert!(is_invalid(&e), "{why}: {e:?}");
    }
    // Wrapped indices within the queue are fine: the counters are free-running.
    let wrapped = with(&|q| {
        q.next_avail = 3;
        q.next_used = 65535;
    });
    transport(Box::<Rng>::default(), &mem).restore(&wrapped).unwrap();
    let e = refused(&mem, &with(&|q| q.max_size = 128));
    assert!(is_mismatch(&e), "{e:?}");
}

#[test]
fn hostile_transport_states_are_refused() {
    let mem = memory();
    let good = running_rng(&mem).0.state();
    let with = |f: &dyn Fn(&mut VirtioTransportState)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let invalid: [(&str, VirtioTransportState); 6] = [
        (
            "DRIVER_OK without FEATURES_OK",
            with(&|s| s.status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK),
        ),
        (
            "active without DRIVER_OK",
            with(&|s| s.status &= !VIRTIO_CONFIG_S_DRIVER_OK),
        ),
        ("DRIVER_OK, neither running nor failed", with(&|s| s.active = false)),
        (
            "NEEDS_RESET in the status",
            with(&|s| s.status |= VIRTIO_CONFIG_S_NEEDS_RESET),
        ),
        (
            "no VERSION_1",
            with(&|s| s.acked_features = 1 << VIRTIO_RING_F_EVENT_IDX),
        ),
        ("unknown interrupt bits", with(&|s| s.interrupt_status = 4)),
    ];
    for (why, state) in &invalid {
        let e = refused(&mem, state);
        assert!(is_invalid(&e), "{why}: {e:?}");
    }
    let event_idx = with(&|s| s.queues[0].event_idx_enabled = false);
    assert!(is_invalid(&refused(&mem, &event_idx)));
    let mismatch: [(&str, VirtioTransportState); 4] = [
        ("another device type", with(&|s| s.device_type = 2)),
        ("another queue count", with(&|s| s.queues.push(s.queues[0].clone()))),
        (
            "features this device does not offer",
            with(&|s| s.acked_features |= 1 << 5),
        ),
        (
            "another device's own state",
            with(&|s| s.device = VirtioDeviceState::Block(BlockState { capacity_sectors: 8 })),
        ),
    ];
    for (why, state) in &mismatch {
        let e = refused(&mem, state);
        assert!(is_mismatch(&e), "{why}: {e:?}");
    }
}

#[test]
fn a_state_is_refused_by_another_device_type() {
    let mem = memory();
    let rng = running_rng(&mem).0.state();
    let (_dir, config) = disk();
    let mut blk = transport(Box::new(Block::open(&config).unwrap()), &mem);
    assert!(matches!(
        blk.restore(&rng),
        Err(StateError::Mismatch { what: "virtio-blk", .. })
    ));
    // The right type with another disk size.
    let mut saved = blk.state();
    saved.device = VirtioDeviceState::Block(BlockState { capacity_sectors: 4096 });
    assert!(matches!(
        blk.restore(&saved),
        Err(StateError::Mismatch { what: "virtio-blk", .. })
    ));
    let e = refused(&mem, &saved);
    assert!(is_mismatch(&e), "a block state into virtio-rng: {e:?}");
}

#[test]
fn states_round_trip_through_json() {
    let mem = memory();
    let saved = running_rng(&mem).0.state();
    let transport_json = serde_json::to_string(&saved).unwrap();
    assert_eq!(
        serde_json::from_str::<VirtioTransportState>(&transport_json).unwrap(),
        saved
    );
    for device in [
        VirtioDeviceState::Stateless,
        VirtioDeviceState::Block(BlockState { capacity_sectors: 2048 }),
        VirtioDeviceState::Net(NetState {
            mac: [2, 0, 0, 0, 0, 1],
            rx_frame: vec![0; 60],
            rx_avail_seen: 7,
        }),
    ] {
        let json = serde_json::to_string(&device).unwrap();
        assert_eq!(serde_json::from_str::<VirtioDeviceState>(&json).unwrap(), device);
    }
    // A state file with a field this version does not know is refused, not ignored.
    let mut value: serde_json::Value = serde_json::from_str(&transport_json).unwrap();
    value["extra"] = serde_json::Value::Bool(true);
    assert!(serde_json::from_value::<VirtioTransportState>(value).is_err());
}
