//! `keyturn mcp-proxy`: placeholder.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {}
pub async fn run(_a: ProxyArgs) -> anyhow::Result<u8> { Ok(2) }
