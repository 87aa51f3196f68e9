//! Clients of eventvault's HTTP API, kept apart from the service so that
//! what only they use (an HTTP client, histograms, decimals, sqlx's `any`
//! driver) is not in the service's dependency tree:
//!
//! - `eventvault-bench`, the load tool of docs/PERFORMANCE.md;
//! - `eventvault-balances`, the example read model of the README;
//! - [`sse`], the Server-Sent Events reader both use (and the service's
//!   tests).

pub mod sse;
