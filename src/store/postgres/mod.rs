//! PostgreSQL: what crosses processes sharing one database (notes of
//! committed changes, leadership).

pub mod leader;
pub mod listen;
pub mod notify;
#[cfg(test)]
mod testdb;
