//! virtio-rng / entropy device (VIRTIO 1.x section 5.4): fills every device-writable
//! buffer the guest offers with bytes from getrandom(2).

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::queue_handler::{self, Chain};
use super::{COMMON_FEATURES, NeedsReset, QueueContext, VirtioDevice};

const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most; the guest asks again for more.
const MAX_REQUEST: usize = 64 << 10;

pub struct Rng {
    chain: Chain,
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng {
            chain: Chain::default(),
            buf: vec![0; MAX_REQUEST],
        }
    }
}

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writing into the rest of a valid buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, _acked: u64) -> Result<(), String> {
        Ok(())
    }

    fn reset(&mut self) {}

    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, index: usize) -> Result<(), NeedsReset> {
        if index != 0 {
            return Ok(());
        }
        ctx.serve_queue(0, |ctx| {
            let mut used_any = false;
            // Only writable buffers make sense here; limit the request to what is served.
            while queue_handler::pop_chain(&mut ctx.queues[0], ctx.mem, u64::from(u32::MAX), &mut self.chain)? {
                let mut written = 0;
                if self.chain.error.is_none() && self.chain.readable.is_empty() {
                    let n = (self.chain.writable_len as usize).min(MAX_REQUEST);
                    match getrandom(&mut self.buf[..n]) {
                        Ok(()) => written = queue_handler::write_to(ctx.mem, &self.chain.writable, 0, &self.buf[..n]),
                        Err(e) => tracing::warn!("virtio-rng: getrandom: {e}"),
                    }
                } else {
                    tracing::debug!("virtio-rng: bad request {:?}", self.chain.error);
                }
                queue_handler::add_used(&mut ctx.queues[0], ctx.mem, self.chain.head, written as u32)?;
                used_any = true;
            }
            Ok(used_any)
        })
    }
}
