//! A bound in front of the ZeroMQ decoder. The `zeromq` crate allocates whatever size a frame
//! header announces, so one 10-byte frame announcing 2^61 bytes from a hostile (or broken) KV
//! event publisher would abort the node, and a message of endless `MORE` frames would grow
//! without bound. This crate has no option for either.
//!
//! So the node's ZeroMQ sockets do not connect to an engine's TCP endpoint directly: each
//! connects to a loopback relay made for that connection, which dials the engine and reads what
//! the engine sends as ZMTP 3 framing (the 64-byte greeting, then frames: a flags byte and a
//! 1- or 8-byte size). Frames and messages within the bounds pass byte for byte; past a bound
//! the relay closes both sides, the socket sees the connection end, and the subscriber
//! reconnects with back-off. What the node sends (subscriptions, replay requests) passes
//! unchanged. `ipc://` endpoints are local to the engine's host and are used directly.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest frame an engine may send: a KV-event batch of thousands of blocks is a few MiB.
pub const MAX_FRAME: u64 = 64 * 1024 * 1024;
/// Largest multipart message (all its frames), and the most frames in one.
pub const MAX_MESSAGE: u64 = 128 * 1024 * 1024;
pub const MAX_FRAMES: usize = 16;

const GREETING: usize = 64;
const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// A relay for one connection; dropping it stops the relay.
pub struct Guarded {
    /// The endpoint to connect the ZeroMQ socket to instead of the engine's.
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A relay to `endpoint` (`tcp://host:port`) for the next connection, or `None` for endpoints
/// used directly (`ipc://`, `inproc://`). The relay serves one connection, then ends.
pub async fn relay(endpoint: &str, connect_timeout: Duration) -> std::io::Result<Option<Guarded>> {
    let Some(upstream) = endpoint.strip_prefix("tcp://") else { return Ok(None) };
    let upstream = upstream.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local: SocketAddr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let Ok(Ok((client, _))) = tokio::time::timeout(connect_timeout, listener.accept()).await else { return };
        drop(listener);
        let engine = match tokio::time::timeout(connect_timeout, TcpStream::connect(&upstream)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
        if let Err(why) = pump(client, engine).await {
            tracing::warn!(endpoint = %upstream, %why, "kv events: connection closed by the frame bound");
        }
    });
    Ok(Some(Guarded { endpoint: format!("tcp://{local}"), task }))
}

/// Relays until either side closes; `Err` names a bound the engine broke.
async fn pump(client: TcpStream, engine: TcpStream) -> Result<(), String> {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut engine_rx, mut engine_tx) = engine.into_split();
    let up = async {
        // Subscriptions and replay requests: the node's own, small.
        let _ = tokio::io::copy(&mut client_rx, &mut engine_tx).await;
        Ok::<(), String>(())
    };
    let down = async {
        let r = frames(&mut engine_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
        r
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Copies the engine's greeting and then frame by frame, checking each header first.
async fn frames<R, W>(rx: &mut R, tx: &mut W) -> Result<(), String>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut greeting = [0u8; GREETING];
    if rx.read_exact(&mut greeting).await.is_err() {
        return Ok(());
    }
    tx.write_all(&greeting).await.map_err(|e| e.to_string())?;
    let (mut message_bytes, mut message_frames) = (0u64, 0usize);
    loop {
        let mut flags = [0u8; 1];
        if rx.read_exact(&mut flags).await.is_err() {
            return Ok(());
        }
        let flags = flags[0];
        let mut header = vec![flags];
        let size = if flags & FLAG_LONG != 0 {
            let mut b = [0u8; 8];
            rx.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            header.extend_from_slice(&b);
            u64::from_be_bytes(b)
        } else {
            let mut b = [0u8; 1];
            rx.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            header.push(b[0]);
            u64::from(b[0])
        };
        if size > MAX_FRAME {
            return Err(format!("a frame of {size} bytes (at most {MAX_FRAME})"));
        }
        if flags & FLAG_COMMAND == 0 {
            message_bytes += size;
            message_frames += 1;
            if message_bytes > MAX_MESSAGE || message_frames > MAX_FRAMES {
                return Err(format!(
                    "a message of {message_frames} frames and {message_bytes} bytes (at most {MAX_FRAMES} and {MAX_MESSAGE})"
                ));
            }
            if flags & FLAG_MORE == 0 {
                (message_bytes, message_frames) = (0, 0);
            }
        }
        tx.write_all(&header).await.map_err(|e| e.to_string())?;
        let copied = tokio::io::copy(&mut (&mut *rx).take(size), tx).await.map_err(|e| e.to_string())?;
        if copied < size {
            return Ok(());
        }
    }
}

/// What the relay passes on of an engine's `input` (greeting and frames), and the bound it
/// broke, if any: [`frames`] run over bytes in memory. For the fuzz targets
/// (`crate::fuzzing`).
pub(crate) fn relay_bytes(input: &[u8]) -> (Vec<u8>, Result<(), String>) {
    let mut rx = input;
    let mut out = Vec::new();
    let r = futures::executor::block_on(frames(&mut rx, &mut out));
    (out, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        if body.len() > 255 {
            v[0] |= FLAG_LONG;
            v.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            v.push(body.len() as u8);
        }
        v.extend_from_slice(body);
        v
    }

    async fn through(input: Vec<u8>) -> (Vec<u8>, Result<(), String>) {
        let mut out = Vec::new();
        let r = frames(&mut input.as_slice(), &mut out).await;
        (out, r)
    }

    #[tokio::test]
    async fn frames_within_bounds_pass_byte_for_byte() {
        let mut input = vec![0xFF; GREETING];
        input.extend(frame(FLAG_COMMAND, b"\x05READY"));
        input.extend(frame(FLAG_MORE, b"kv@topic"));
        input.extend(frame(FLAG_MORE, &7u64.to_be_bytes()));
        input.extend(frame(0, &vec![9u8; 1000]));
        let (out, r) = through(input.clone()).await;
        assert_eq!(r, Ok(()));
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn a_frame_announcing_exabytes_is_cut_before_it_is_forwarded() {
        let mut input = vec![0xFF; GREETING];
        input.push(FLAG_LONG);
        input.extend_from_slice(&(1u64 << 61).to_be_bytes());
        let (out, r) = through(input).await;
        assert!(r.unwrap_err().contains("frame"));
        assert_eq!(out.len(), GREETING, "nothing of the frame reached the decoder");
    }

    #[tokio::test]
    async fn endless_more_frames_are_cut() {
        let mut input = vec![0xFF; GREETING];
        for _ in 0..=MAX_FRAMES {
            input.extend(frame(FLAG_MORE, b"x"));
        }
        let (_, r) = through(input).await;
        assert!(r.unwrap_err().contains("message"));
    }

    /// The relay end to end: a hostile publisher's exabyte frame never reaches the socket, which
    /// sees the connection close.
    #[tokio::test]
    async fn the_relay_closes_on_a_hostile_publisher() {
        let hostile = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hostile.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = hostile.accept().await.unwrap();
            let mut bytes = vec![0xFF; GREETING];
            bytes.push(FLAG_LONG);
            bytes.extend_from_slice(&(1u64 << 61).to_be_bytes());
            let _ = s.write_all(&bytes).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let g = relay(&format!("tcp://{addr}"), Duration::from_secs(2)).await.unwrap().unwrap();
        let mut c = TcpStream::connect(g.endpoint.trim_start_matches("tcp://")).await.unwrap();
        let mut got = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut got)).await.expect("closed in time");
        assert!(n.is_ok());
        assert_eq!(got.len(), GREETING);
        assert!(relay("ipc:///tmp/x", Duration::from_secs(1)).await.unwrap().is_none());
    }
}
