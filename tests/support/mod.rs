//! Test support shared by every test binary (each includes it with
//! `#[path = "support/mod.rs"] mod support;`): private servers (`redis_server`, `nginx`,
//! an HTTPS upstream with a CA of its own in `tls`), a TCP proxy that can hold traffic
//! (`tcp_proxy`), the real binary as a child process (`process`), and the small helpers
//! every test uses (`http`: requests and their JSON, fixtures, metrics, `eventually`).
//!
//! A binary uses only some of it; the rest is dead code there, hence the allow.
#![allow(dead_code)]

pub mod http;
pub mod nginx;
pub mod process;
pub mod redis_server;
pub mod tcp_proxy;
pub mod tls;
