//! Draining one output stream of a run: every byte is read (the child is
//! never blocked on a full pipe), the first `cap` bytes are kept, all of
//! them are counted and hashed.

use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What was read from a stream so far.
pub(super) struct Capture {
    cap: usize,
    kept: Vec<u8>,
    size: u64,
    hasher: Sha256,
}

impl Capture {
    pub(super) fn new(cap: usize) -> Arc<Mutex<Capture>> {
        Arc::new(Mutex::new(Capture {
            cap,
            kept: Vec::new(),
            size: 0,
            hasher: Sha256::new(),
        }))
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.size = self.size.saturating_add(bytes.len() as u64);
        self.hasher.update(bytes);
    }

    /// The kept bytes, the total size and the hex SHA-256 of everything read.
    pub(super) fn finish(shared: &Arc<Mutex<Capture>>) -> (Vec<u8>, u64, String) {
        let mut c = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = std::mem::take(&mut c.kept);
        let hasher = std::mem::take(&mut c.hasher);
        (kept, c.size, hex::encode(hasher.finalize()))
    }
}

/// Reads `stream` to its end into `into`. A read error ends the drain (it is
/// logged; what was read stays).
pub(super) async fn drain<R: AsyncRead + Unpin>(
    mut stream: R,
    into: Arc<Mutex<Capture>>,
    run_id: String,
    which: &'static str,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => into
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(run.id = %run_id, stream = which, error = %e, "reading run output failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_and_hashes_all() {
        let c = Capture::new(4);
        c.lock().unwrap().push(b"hel");
        c.lock().unwrap().push(b"lo world");
        let (kept, size, sha) = Capture::finish(&c);
        assert_eq!(kept, b"hell");
        assert_eq!(size, 11);
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
    }
}
