//! A TCP proxy on loopback that holds every chunk, each way, for a fixed time before passing
//! it on, as the network between two regions would: a fleet "far from Redis" in tests. It
//! adds latency, not a bandwidth limit: chunks are pipelined, each sent once its own delay
//! is over.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The running proxy; it stops (and drops its connections) when dropped.
pub struct DelayProxy {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DelayProxy {
    /// Listen on a free loopback port and relay every connection to `target`, each byte
    /// arriving `one_way` after it was sent.
    pub async fn start(target: SocketAddr, one_way: Duration) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_at(loopback, target, one_way)
            .await
            .expect("a loopback port")
    }

    /// [`Self::start`] on the address `listen` (`scripts/fleet.sh --redis-delay-ms`).
    pub async fn start_at(
        listen: SocketAddr,
        target: SocketAddr,
        one_way: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(relay(client, target, one_way));
            }
        });
        Ok(Self { addr, task })
    }

    /// `redis://` URL of the proxy, for a Redis behind it.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

async fn relay(client: TcpStream, target: SocketAddr, one_way: Duration) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        one_direction(client_read, server_write, one_way),
        one_direction(server_read, client_write, one_way),
    );
}

/// Read chunks as they come and write each one `delay` after it was read.
async fn one_direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buffer).await {
            if n == 0
                || chunks
                    .send((Instant::now() + delay, buffer[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes pass unchanged both ways, and a round trip takes at least twice the delay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_trip_through_it_takes_twice_its_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(40)).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        for message in [&b"PING\r\n"[..], b"second"] {
            let sent = Instant::now();
            client.write_all(message).await.unwrap();
            let mut answer = vec![0u8; message.len()];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(answer, message);
            assert!(
                sent.elapsed() >= Duration::from_millis(80),
                "{:?}",
                sent.elapsed()
            );
        }
    }
}
