//! Black-box tests: each starts its own server on port 0 (in process, or the real binary
//! when signals and crashes are involved) and talks HTTP to it.

mod bad_input;
mod helpers;
mod jobs;
mod ops;
mod shutdown;
mod stats;
