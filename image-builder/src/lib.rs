//! keel-image: builds and inspects Keel appliance disk images.

pub mod build;
pub mod bundle;
pub mod fat;
pub mod flash;
pub mod gpt_layout;
pub mod guest_initramfs;
pub mod host_initramfs;
pub mod identity;
pub mod initramfs;
pub mod inspect;
pub mod qemu;
pub mod uki;
pub mod validate;
