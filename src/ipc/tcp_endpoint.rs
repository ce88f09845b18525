//! Where a client finds Keyturn over TCP, and how it connects: the URL
//! forms `keyturn+tls://host:port` (TLS, any host) and
//! `keyturn+tcp://127.0.0.1:port` (plaintext, loopback only: the client
//! refuses any other host), the bearer token from the environment
//! (`KEYTURN_TOKEN`), a custom CA (`KEYTURN_CA`, for self-signed
//! deployments; else the webpki roots), and the `auth` line every TCP
//! connection starts with. Used by the async client, the CLI and the
//! blocking gate of the integrations. Nothing here imports `app`, `store`
//! or `discord`.

use super::protocol::{read_response, request_line, ResponseError, RpcError};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The variable a client reads its bearer token from by default.
pub const TOKEN_ENV: &str = "KEYTURN_TOKEN";
/// The variable naming a CA certificate file (PEM) to trust.
pub const CA_ENV: &str = "KEYTURN_CA";
/// The variable holding the URL (`--url`).
pub const URL_ENV: &str = "KEYTURN_URL";

/// How long connecting, the TLS handshake and `auth` may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A Keyturn server over TCP, with the token to authenticate.
#[derive(Clone)]
pub struct TcpTarget {
    /// The URL as given (for messages).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    token: String,
    ca: Option<PathBuf>,
}

impl std::fmt::Debug for TcpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("TcpTarget")
            .field("url", &self.url)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// Reads `keyturn+tls://host:port` or `keyturn+tcp://host:port`:
/// `(host, port, tls)`.
pub fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("keyturn+tls://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("keyturn+tcp://") {
        (false, r)
    } else {
        return Err(format!(
            "`{url}` is not a Keyturn URL: use keyturn+tls://HOST:PORT (or keyturn+tcp://127.0.0.1:PORT on this host)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("`{url}` has no port: use keyturn+tls://HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{url}`: `{port}` is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return Err(format!("`{url}`: no usable host name"));
    }
    Ok((host.to_string(), port, tls))
}

/// Whether every address `host` names is a loopback address.
fn is_loopback(host: &str, port: u16) -> bool {
    match (host, port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

impl TcpTarget {
    /// A target from its URL, its token and an optional CA file. A
    /// plaintext URL to a host that is not loopback is refused: the token
    /// would cross the network in clear.
    pub fn new(url: &str, token: String, ca: Option<PathBuf>) -> Result<TcpTarget, String> {
        let (host, port, tls) = parse_url(url)?;
        if !tls && !is_loopback(&host, port) {
            return Err(format!(
                "`{url}`: plaintext keyturn+tcp:// is for loopback addresses only (the token would cross the network in clear); use keyturn+tls://"
            ));
        }
        if token.is_empty() {
            return Err(format!(
                "no token for {url}: set {TOKEN_ENV} (or the variable --token-env names) to the agent's token from `keyturn token issue`"
            ));
        }
        Ok(TcpTarget {
            url: url.to_string(),
            host,
            port,
            tls,
            token,
            ca,
        })
    }

    /// A target from `url`, the token in variable `token_env` (default
    /// `KEYTURN_TOKEN`) and the CA file `ca` (default `KEYTURN_CA`).
    pub fn from_env(
        url: &str,
        token_env: Option<&str>,
        ca: Option<&Path>,
    ) -> Result<TcpTarget, String> {
        let var = token_env.unwrap_or(TOKEN_ENV);
        let token = std::env::var(var).unwrap_or_default();
        if token.is_empty() {
            return Err(format!(
                "no token for {url}: set {var} to the agent's token from `keyturn token issue`"
            ));
        }
        let ca = ca.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(CA_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        TcpTarget::new(url, token, ca)
    }

    /// The line that opens every TCP connection (call id 0).
    pub fn auth_line(&self) -> String {
        let mut l = request_line(0, "auth", &json!({"token": self.token}));
        l.push('\n');
        l
    }

    /// The TLS configuration: the CA file's certificates when one is
    /// given, else the webpki roots.
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
                for c in certs {
                    let c = c.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("CA file {} holds no certificate", path.display()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }

    fn server_name(&self) -> Result<rustls_pki_types::ServerName<'static>, String> {
        rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| format!("`{}` is not a valid TLS server name: {e}", self.host))
    }

    /// Connects, does the TLS handshake (for `keyturn+tls`) and
    /// authenticates, blocking; each step bounded by [`CONNECT_TIMEOUT`].
    pub fn connect_blocking(&self) -> Result<BlockingStream, DialError> {
        let io = |e: std::io::Error| DialError::Connect(format!("{}: {e}", self.url));
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(io)?
            .collect();
        let mut last = None;
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let sock = sock.ok_or_else(|| {
            io(last.unwrap_or_else(|| std::io::Error::other("the host has no address")))
        })?;
        sock.set_nodelay(true).map_err(io)?;
        sock.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
        sock.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
        let mut stream = if self.tls {
            let conn = rustls::ClientConnection::new(
                self.tls_config().map_err(DialError::Tls)?,
                self.server_name().map_err(DialError::Tls)?,
            )
            .map_err(|e| DialError::Tls(e.to_string()))?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).map_err(|e| {
                    DialError::Tls(format!("TLS handshake with {} failed: {e}", self.url))
                })?;
            }
            BlockingStream::Tls(Box::new(s))
        } else {
            BlockingStream::Plain(sock)
        };
        stream.write_all(self.auth_line().as_bytes()).map_err(io)?;
        stream.flush().map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            return Err(DialError::Connect(format!(
                "{}: the server closed the connection during auth",
                self.url
            )));
        }
        read_auth(&line)?;
        // Nothing follows the auth answer until a call is sent, so the
        // reader's buffer is empty here.
        let stream = reader.into_inner();
        stream.socket().set_read_timeout(None).map_err(io)?;
        stream.socket().set_write_timeout(None).map_err(io)?;
        Ok(stream)
    }

    /// The async connection: TCP, TLS for `keyturn+tls`, and `auth`.
    pub async fn connect(&self) -> Result<Box<dyn AsyncStream>, DialError> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let io = |e: std::io::Error| DialError::Connect(format!("{}: {e}", self.url));
        let dial = async {
            let sock = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(io)?;
            sock.set_nodelay(true).map_err(io)?;
            let mut stream: Box<dyn AsyncStream> = if self.tls {
                let connector =
                    tokio_rustls::TlsConnector::from(self.tls_config().map_err(DialError::Tls)?);
                let s = connector
                    .connect(self.server_name().map_err(DialError::Tls)?, sock)
                    .await
                    .map_err(|e| {
                        DialError::Tls(format!("TLS handshake with {} failed: {e}", self.url))
                    })?;
                Box::new(s)
            } else {
                Box::new(sock)
            };
            stream
                .write_all(self.auth_line().as_bytes())
                .await
                .map_err(io)?;
            stream.flush().await.map_err(io)?;
            // Byte by byte: nothing after the answer's newline may be
            // taken from the stream (the caller frames it afresh).
            let mut line = Vec::new();
            let mut r = tokio::io::BufReader::with_capacity(1, &mut stream);
            loop {
                let buf = r.fill_buf().await.map_err(io)?;
                let Some(&b) = buf.first() else {
                    return Err(DialError::Connect(format!(
                        "{}: the server closed the connection during auth",
                        self.url
                    )));
                };
                r.consume(1);
                if b == b'\n' {
                    break;
                }
                if line.len() > 64 * 1024 {
                    return Err(DialError::Protocol("an overlong answer to auth".into()));
                }
                line.push(b);
            }
            read_auth(&String::from_utf8_lossy(&line))?;
            Ok(stream)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, dial)
            .await
            .map_err(|_| {
                DialError::Connect(format!(
                    "{}: no answer within {CONNECT_TIMEOUT:?}",
                    self.url
                ))
            })?
    }
}

/// Reads the answer to `auth`.
fn read_auth(line: &str) -> Result<(), DialError> {
    match read_response(line.trim_end(), 0) {
        Ok(_) => Ok(()),
        Err(ResponseError::Rpc(e)) => Err(DialError::Refused(e)),
        Err(ResponseError::Protocol(why)) => Err(DialError::Protocol(why)),
    }
}

/// Why a TCP connection could not be opened and authenticated.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to Keyturn at {0}")]
    Connect(String),
    #[error("{0}")]
    Tls(String),
    /// The server answered `auth` with an error (`unauthorized`, …).
    #[error("{0}")]
    Refused(RpcError),
    #[error("Keyturn sent something that is not a JSON-RPC response: {0}")]
    Protocol(String),
}

/// An async byte stream to the server (plain TCP or TLS).
pub trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A blocking TCP connection, plain (loopback) or TLS.
pub enum BlockingStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl BlockingStream {
    /// The TCP socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &TcpStream {
        match self {
            BlockingStream::Plain(s) => s,
            BlockingStream::Tls(s) => &s.sock,
        }
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Plain(s) => s.read(buf),
            BlockingStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Plain(s) => s.write(buf),
            BlockingStream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BlockingStream::Plain(s) => s.flush(),
            BlockingStream::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_and_tls() {
        assert_eq!(
            parse_url("keyturn+tls://gw.example:7443"),
            Ok(("gw.example".into(), 7443, true))
        );
        assert_eq!(
            parse_url("keyturn+tcp://127.0.0.1:7443/"),
            Ok(("127.0.0.1".into(), 7443, false))
        );
        assert_eq!(
            parse_url("keyturn+tls://[::1]:1"),
            Ok(("::1".into(), 1, true))
        );
        for bad in [
            "https://x:1",
            "keyturn+tls://x",
            "keyturn+tls://x:port",
            "keyturn+tls://:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plaintext_is_for_loopback_only_and_a_token_is_required() {
        let t = || "kt_x".to_string();
        assert!(TcpTarget::new("keyturn+tcp://127.0.0.1:1", t(), None).is_ok());
        let e = TcpTarget::new("keyturn+tcp://192.0.2.1:1", t(), None).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert!(TcpTarget::new("keyturn+tls://192.0.2.1:1", t(), None).is_ok());
        assert!(TcpTarget::new("keyturn+tls://192.0.2.1:1", String::new(), None).is_err());
        let dbg = format!(
            "{:?}",
            TcpTarget::new("keyturn+tls://h:1", "kt_secret".into(), None).unwrap()
        );
        assert!(!dbg.contains("kt_secret"), "{dbg}");
    }
}
