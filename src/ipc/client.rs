//! A small client for the socket (or, given a URL, the TCP listener), used
//! by the CLI and the tests.

use super::protocol::{read_response, request_line, ResponseError, RpcError};
use super::tcp_endpoint::{AsyncStream, DialError, TcpTarget};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::path::Path;
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to Keyturn at {path}: {source} (is `keyturn serve` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to Keyturn lost: {0}")]
    Io(String),
    #[error("Keyturn sent something that is not a JSON-RPC response: {0}")]
    Protocol(String),
    #[error("{0}")]
    Rpc(RpcError),
    /// Connecting over TCP failed (connect, TLS), before any call.
    #[error("{0}")]
    Dial(String),
}

impl From<DialError> for ClientError {
    fn from(e: DialError) -> ClientError {
        match e {
            DialError::Refused(e) => ClientError::Rpc(e),
            DialError::Protocol(why) => ClientError::Protocol(why),
            other => ClientError::Dial(other.to_string()),
        }
    }
}

impl From<ResponseError> for ClientError {
    fn from(e: ResponseError) -> ClientError {
        match e {
            ResponseError::Rpc(e) => ClientError::Rpc(e),
            ResponseError::Protocol(why) => ClientError::Protocol(why),
        }
    }
}

pub struct Client {
    framed: Framed<Box<dyn AsyncStream>, LinesCodec>,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Client::over(Box::new(stream)))
    }

    /// Connects over TCP (TLS for `keyturn+tls://`) and authenticates with
    /// the target's bearer token: every call then acts as its agent.
    pub async fn connect_tcp(target: &TcpTarget) -> Result<Client, ClientError> {
        Ok(Client::over(target.connect().await?))
    }

    fn over(stream: Box<dyn AsyncStream>) -> Client {
        Client {
            framed: Framed::new(stream, LinesCodec::new_with_max_length(64 * 1024 * 1024)),
            next_id: 1,
        }
    }

    /// Calls `method` and waits for its response.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = request_line(id, method, &params);
        if let Err(e) = self.framed.send(line).await {
            // A server that refuses a connection (too many connections, not
            // an admin) writes why, then closes: report that, not the
            // broken pipe the send ran into.
            return Err(self
                .refusal(id)
                .await
                .unwrap_or(ClientError::Io(e.to_string())));
        }
        let line = match self.framed.next().await {
            None => {
                return Err(ClientError::Io(
                    "the server closed the connection without an answer".into(),
                ))
            }
            Some(Err(e)) => return Err(ClientError::Io(e.to_string())),
            Some(Ok(l)) => l,
        };
        Ok(read_response(&line, id)?)
    }

    /// The error line a refusing server left before closing, if any (read
    /// for at most a second).
    async fn refusal(&mut self, id: u64) -> Option<ClientError> {
        let next = tokio::time::timeout(std::time::Duration::from_secs(1), self.framed.next());
        let Ok(Some(Ok(line))) = next.await else {
            return None;
        };
        match read_response(&line, id) {
            Err(ResponseError::Rpc(e)) => Some(ClientError::Rpc(e)),
            _ => None,
        }
    }
}
