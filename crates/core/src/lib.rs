//! The serving core every Marquee model service reuses: model repository with hot reload,
//! tch runner lanes on dedicated threads, the dynamic batcher, typed layered config, telemetry,
//! the error → `Status` mapping, the server layer stack and the bootstrap with graceful shutdown.
#![deny(unsafe_code)]

pub mod admin;
pub mod alloc;
pub mod batcher;
pub mod config;
pub mod deadline;
pub mod error;
pub mod layers;
pub mod liveness;
pub mod methods;
pub mod metrics;
#[cfg(feature = "torch")]
pub mod model;
#[cfg(feature = "torch")]
pub mod oip;
pub mod propagation;
#[cfg(feature = "torch")]
pub mod repository;
#[cfg(feature = "torch")]
pub mod runner;
pub mod serve;
#[cfg(feature = "torch")]
pub mod server;
pub mod telemetry;

pub use error::ServeError;
