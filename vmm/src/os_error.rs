//! Readable text for OS errors. A leaf: every module may use it without depending on
//! the VMM's error type (which names most modules' errors).

use std::io;

/// `io::Error`'s text without the trailing " (os error N)", which operators do not need.
pub fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Same for the errno type the rust-vmm crates return.
pub fn errno_message(e: &vmm_sys_util::errno::Error) -> String {
    os_message(&io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_message_drops_errno_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_message(&e), "No such file or directory");
        let e = io::Error::other("plain");
        assert_eq!(os_message(&e), "plain");
    }
}
