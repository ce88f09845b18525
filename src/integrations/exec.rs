//! `keyturn exec`: placeholder.
#[derive(clap::Args, Debug, Clone)]
pub struct ExecArgs {}
pub fn main(_a: ExecArgs) -> u8 { 126 }
