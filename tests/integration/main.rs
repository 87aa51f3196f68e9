//! Integration tests: the real service over HTTP, on SQLite and PostgreSQL.

mod common;

mod access;
mod append;
mod at_rest;
mod audit;
mod balances;
mod concurrency;
mod forget;
mod keys;
mod metrics;
mod read;
mod relay;
mod snapshots;
mod startup;
mod subscribe;
