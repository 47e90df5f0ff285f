//! A small DNS forwarder for guests: listens on a bridge's address (which the
//! DHCP server announces as the guests' DNS server) and relays each query,
//! unchanged, to the host's upstream servers, over UDP and TCP.
//!
//! No cache and no rewriting: the upstream's answer goes back byte for byte.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use super::NetError;

/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// A forwarder bound to its address, ready to [`Forwarder::run`].
pub struct Forwarder {
    name: String,
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    upstreams: watch::Receiver<Vec<SocketAddr>>,
}

/// Binds UDP and TCP `listen`. `name` (the bridge) labels errors and logs.
pub async fn bind(
    name: &str,
    listen: SocketAddrV4,
    upstreams: watch::Receiver<Vec<SocketAddr>>,
) -> Result<Forwarder, NetError> {
    let err = |op| {
        let bridge = name.to_owned();
        move |source| NetError::Dns { bridge, op, source }
    };
    let udp = UdpSocket::bind(listen).await.map_err(err("bind udp"))?;
    let tcp = TcpListener::bind(listen).await.map_err(err("bind tcp"))?;
    Ok(Forwarder {
        name: name.to_owned(),
        udp: Arc::new(udp),
        tcp,
        upstreams,
    })
}

impl Forwarder {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Serves until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), NetError> {
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => {
                    let (n, client) = match r {
                        Ok(x) => x,
                        Err(e) => { tracing::warn!(bridge = %self.name, "dns receive: {e}"); continue; }
                    };
                    let query = buf[..n].to_vec();
                    let udp = self.udp.clone();
                    let ups = self.upstreams.borrow().clone();
                    let name = self.name.clone();
                    tokio::spawn(async move {
                        match forward_udp(&query, &ups).await {
                            Some(answer) => { let _ = udp.send_to(&answer, client).await; }
                            None => tracing::debug!(bridge = %name, %client, "no upstream answered"),
                        }
                    });
                }
                r = self.tcp.accept() => {
                    let Ok((stream, _)) = r else { continue };
                    let ups = self.upstreams.borrow().clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), serve_tcp(stream, ups)).await;
                    });
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// Sends `query` to each upstream in turn; returns the first answer whose id matches.
async fn forward_udp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    for up in upstreams {
        let Ok(sock) = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await else {
            continue;
        };
        if sock.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok((n, from))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            if from == *up && n >= 12 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// One TCP client: length-prefixed queries, each relayed over TCP.
async fn serve_tcp(mut client: TcpStream, upstreams: Vec<SocketAddr>) -> std::io::Result<()> {
    loop {
        let len = match client.read_u16().await {
            Ok(l) => l as usize,
            Err(_) => return Ok(()),
        };
        let mut query = vec![0u8; len];
        client.read_exact(&mut query).await?;
        let mut answered = false;
        for up in &upstreams {
            let r = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                let mut s = TcpStream::connect(up).await?;
                s.write_u16(len as u16).await?;
                s.write_all(&query).await?;
                let n = s.read_u16().await? as usize;
                let mut answer = vec![0u8; n];
                s.read_exact(&mut answer).await?;
                std::io::Result::Ok(answer)
            })
            .await;
            if let Ok(Ok(answer)) = r {
                client.write_u16(answer.len() as u16).await?;
                client.write_all(&answer).await?;
                answered = true;
                break;
            }
        }
        if !answered {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake upstream that answers every query with the query plus a marker byte.
    async fn fake_upstream() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut answer = buf[..n].to_vec();
                answer[2] |= 0x80; // QR: this is a response
                answer.push(0xAA);
                let _ = s.send_to(&answer, from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn relays_udp_queries_to_the_first_answering_upstream() {
        let good = fake_upstream().await;
        // A dead upstream first: the forwarder must move on to the next.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let (_tx, rx) = watch::channel(vec![dead, good]);
        let fwd = bind("lo-test", "127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        let listen = fwd.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(fwd.run(stop_rx));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let query = [
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'f', b'o', b'o', 0, 0, 1, 0, 1,
        ];
        client.send_to(&query, listen).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("answer within 5 s")
            .unwrap();
        assert_eq!(&buf[..2], &[0x12, 0x34]);
        assert_eq!(buf[n - 1], 0xAA);
        stop_tx.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
}
