//! Authentication: SCRAM-SHA-256 and md5 primitives (exchanges to follow).

pub mod md5;
pub mod scram;
