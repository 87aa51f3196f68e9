//! Integration tests: the real service over HTTP, on SQLite and PostgreSQL.

mod common;

mod access;
mod append;
mod at_rest;
mod audit;
mod backup;
mod balances;
mod cluster;
mod concurrency;
mod cors;
mod crash;
mod faults;
mod forget;
mod forget_faults;
mod host;
mod hsm;
mod jwt;
mod key_cache;
mod keyloss;
mod keys;
mod limits;
mod metrics;
mod openapi;
mod production;
mod read;
mod relay;
mod roles;
mod snapshots;
mod startup;
mod subscribe;
mod tls;
mod tour;
mod unauthenticated;
