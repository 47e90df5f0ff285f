//! Guest RAM in a snapshot: the layout goes in the state, the bytes in their own stream
//! (hundreds of MiB do not belong in JSON), region after region in guest-address order.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::os_error::os_message;
use crate::state_error::StateError;

/// One RAM region: where it sits in the guest and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub len: u64,
}

/// The layout of `mem`.
pub fn layout(mem: &GuestMemory) -> Vec<MemoryRegionState> {
    mem.iter()
        .map(|r| MemoryRegionState {
            guest_addr: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

/// Checks that `saved` is the layout of `mem` (the restored VM was built with the same
/// memory size).
pub fn check_layout(mem: &GuestMemory, saved: &[MemoryRegionState]) -> Result<(), StateError> {
    let here = layout(mem);
    if here != saved {
        return Err(StateError::Mismatch {
            what: "guest memory",
            reason: format!("saved regions {saved:?}, this VM has {here:?} (another memory size?)"),
        });
    }
    Ok(())
}

/// Chunk size for copying: large enough for full-speed I/O, small enough to stay cheap.
const CHUNK: usize = 1 << 20;

/// Writes every byte of guest RAM to `out`.
pub fn write(mem: &GuestMemory, out: &mut impl Write) -> Result<(), StateError> {
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let n = (region.len() - offset).min(CHUNK as u64) as usize;
            let at = GuestAddress(region.start_addr().0 + offset);
            mem.read_slice(&mut buf[..n], at).map_err(guest_err)?;
            out.write_all(&buf[..n]).map_err(|e| StateError::Io {
                what: "writing guest memory",
                reason: os_message(&e),
            })?;
            offset += n as u64;
        }
    }
    Ok(())
}

/// Fills guest RAM from `input`, which must hold exactly as many bytes as `mem` has.
pub fn read(mem: &GuestMemory, input: &mut impl Read) -> Result<(), StateError> {
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let n = (region.len() - offset).min(CHUNK as u64) as usize;
            input.read_exact(&mut buf[..n]).map_err(|e| StateError::Io {
                what: "reading guest memory",
                reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the memory image is shorter than the guest's RAM".into()
                } else {
                    os_message(&e)
                },
            })?;
            let at = GuestAddress(region.start_addr().0 + offset);
            mem.write_slice(&buf[..n], at).map_err(guest_err)?;
            offset += n as u64;
        }
    }
    // One byte more would mean the image belongs to a bigger guest.
    match input.read(&mut buf[..1]) {
        Ok(0) => Ok(()),
        Ok(_) => Err(StateError::Mismatch {
            what: "guest memory",
            reason: "the memory image is longer than the guest's RAM".into(),
        }),
        Err(e) => Err(StateError::Io {
            what: "reading guest memory",
            reason: os_message(&e),
        }),
    }
}

fn guest_err(e: vm_memory::GuestMemoryError) -> StateError {
    StateError::Io {
        what: "guest memory",
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MemorySize;

    #[test]
    fn memory_round_trips_and_a_wrong_size_is_refused() {
        let mem = crate::memory::allocate(MemorySize::mib(16)).unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress((16 << 20) - 4)).unwrap();
        let mut image = Vec::new();
        write(&mem, &mut image).unwrap();
        assert_eq!(image.len(), 16 << 20);

        let fresh = crate::memory::allocate(MemorySize::mib(16)).unwrap();
        read(&fresh, &mut image.as_slice()).unwrap();
        assert_eq!(fresh.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234_5678);
        assert_eq!(
            fresh.read_obj::<u32>(GuestAddress((16 << 20) - 4)).unwrap(),
            0xdead_beef
        );
        check_layout(&fresh, &layout(&mem)).unwrap();

        let short = &image[..image.len() - 1];
        assert!(matches!(read(&fresh, &mut &short[..]), Err(StateError::Io { .. })));
        let mut long = image.clone();
        long.push(0);
        assert!(matches!(
            read(&fresh, &mut long.as_slice()),
            Err(StateError::Mismatch { .. })
        ));
        let bigger = crate::memory::allocate(MemorySize::mib(32)).unwrap();
        assert!(matches!(
            check_layout(&bigger, &layout(&mem)),
            Err(StateError::Mismatch { .. })
        ));
    }
}
