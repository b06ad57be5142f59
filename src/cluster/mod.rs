//! The cluster room: what several `tally serve` processes on one Redis share that is not
//! about jobs. So far: the connection to Redis (one server or a cluster, [`conn`]) and
//! named, fenced leases ([`lease`]), with an in-process implementation for the
//! single-process stores, so one conformance suite holds both to the same rules.
//!
//! Built for the pipeline across replicas (one journal writer at a time) and the live
//! series (each source polled by one replica); the job queue keeps its own per-job
//! leases in its scripts.

pub mod conn;
pub mod lease;
