//! Integration tests: the real service over HTTP, on SQLite and PostgreSQL.

mod common;

mod append;
mod at_rest;
mod concurrency;
mod read;
mod startup;
