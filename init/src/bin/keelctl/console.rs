//! `keelctl console`: the guest's serial console on this terminal (raw mode, Ctrl-] to
//! detach), over the API's upgraded connection.

use std::io::{IsTerminal, Read};

use anyhow::Context;

use keel_init::api::client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::DETACH;

pub async fn console(client: &Client, name: &str, replay: usize) -> anyhow::Result<u8> {
    let io = client.console(name, replay).await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        eprintln!("Connected to {name}'s console. Ctrl-] detaches.\r");
        Some(RawMode::enable()?)
    } else {
        None
    };
    // stdin is read on a thread (blocking reads), forwarded through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut out = tokio::io::stdout();
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => { out.write_all(&buf[..n]).await?; out.flush().await?; }
            },
            keys = rx.recv(), if stdin_open => match keys {
                Some(keys) => {
                    let (send, detach) = match keys.iter().position(|&b| b == DETACH) {
                        Some(i) => (&keys[..i], true),
                        None => (&keys[..], false),
                    };
                    if !send.is_empty() { wr.write_all(send).await?; }
                    if detach { break; }
                }
                // End of piped input: keep showing output until the API closes or
                // we are interrupted, as `cat | keelctl console` users expect.
                None => stdin_open = false,
            },
        }
    }
    if tty {
        eprintln!("\r\nDetached from {name}'s console.\r");
    }
    Ok(0)
}

/// The terminal in raw mode for the console's lifetime.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal mode")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("setting the terminal to raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}
