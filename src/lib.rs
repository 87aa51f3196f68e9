//! eventvault: a GDPR-aware, encrypted event store served over HTTP.
//!
//! # Layout
//!
//! - [`domain`]: validated identifiers and event shapes; knows neither HTTP
//!   nor SQL.
//! - [`crypto`]: AES-256-GCM seal/open and key wrapping; the only module that
//!   sees key bytes.
//! - [`keys`]: the key manager (data keys per subject, master key, caches).
//! - [`policy`]: `policies/*.toml` — field classification and roles.
//! - [`audit`]: audit records, their canonical encoding and hash chain.
//! - [`principals`]: callers, their roles and token hashes.
//! - [`jwt`]: callers from the identity provider: bearer JWTs, its key set.
//! - [`store`]: all SQL — connections, migrations, reads, the group-commit
//!   writer, the keystore tables.
//! - [`service`]: classify + seal on append, open + mark on read.
//! - [`http`]: the axum API; the only module that knows its JSON shapes.
//! - [`relay`]: the outbox relay to NATS JetStream: committed events, clear
//!   fields and sealed blobs as stored, in position order, at least once.
//! - [`metrics`]: the Prometheus registry of one application and what it
//!   counts; labels carry no identifiers.
//! - [`config`]: the configuration and the flags it comes from.
//! - [`cli`]: the commands other than `serve`.
//! - [`app`]: start-up and graceful shutdown.
//! - `percent`: RFC 3986 percent-encoding of the URIs the service handles.

#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod http;
pub mod jwt;
pub mod keys;
pub mod metrics;
mod percent;
pub mod policy;
pub mod principals;
pub mod relay;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod tls;
