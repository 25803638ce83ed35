//! The serving core every Marquee service reuses: the model-service kit ([`kit`]: repository
//! with hot reload for any model family, readiness, drain, OIP), the model repository,
//! tch runner lanes on dedicated threads, the dynamic batcher, typed layered config, telemetry,
//! the error → `Status` mapping, the server layer stack and the bootstrap with graceful shutdown.
#![deny(unsafe_code)]

pub mod admin;
pub mod alloc;
pub mod batcher;
pub mod config;
pub mod deadline;
#[cfg(feature = "torch")]
pub mod device;
pub mod error;
#[cfg(feature = "torch")]
pub mod kit;
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
pub mod simd;
pub mod telemetry;
pub mod tenant;
#[cfg(feature = "torch")]
pub mod tensor;

pub use error::ServeError;
