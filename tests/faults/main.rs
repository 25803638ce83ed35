//! The fault suite (issue 10): a gateway (in process) in front of TWO vision replicas (child
//! processes, `fashion_cnn`, one lane, one intra-op thread) under steady load from real gRPC
//! clients, while one fault happens mid-load. Every case prints one line
//! `FAULT-RESULT | case | expected | measured` to stderr (the source of docs/RELIABILITY.md)
//! before it asserts, so a failing case still reports what it measured.
//!
//! Needs the service binaries: `cargo build --bins`, and `MARQUEE_BIN_DIR` pointing at them
//! when the test binary does not live beside them.
//!
//! Run: `cargo test -p marquee-e2e --test faults -- --test-threads=1 --nocapture`.

mod drain;
mod feedback;
mod harness;
mod hostile;
mod kill;
mod png;
mod poison;
mod reload;
