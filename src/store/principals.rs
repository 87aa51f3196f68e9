//! The principals table: names, roles, and token hashes (never tokens) or
//! client certificate fingerprints.

use super::{EventStore, StoreError, now_us, on_db};

/// A principal row; `roles` is a JSON array of role names. It has a token
/// hash, a client certificate's fingerprint, or (the schema allows) both.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PrincipalRow {
    pub name: String,
    pub roles: String,
    pub token_hash: Option<String>,
    pub client_cert_sha256: Option<String>,
    pub created_at: i64,
}

/// How a new principal authenticates.
#[derive(Debug, Clone, Copy)]
pub enum NewCredential<'a> {
    /// The SHA-256 of its bearer token.
    TokenHash(&'a str),
    /// The SHA-256 of its client certificate's DER.
    Certificate(&'a str),
}

impl EventStore {
    /// Adds a principal; `false` if the name is taken.
    pub async fn insert_principal(
        &self,
        name: &str,
        roles_json: &str,
        credential: NewCredential<'_>,
    ) -> Result<bool, StoreError> {
        let (token_hash, certificate) = match credential {
            NewCredential::TokenHash(h) => (Some(h), None),
            NewCredential::Certificate(f) => (None, Some(f)),
        };
        let done = on_db!(&self.db, |pool| {
            sqlx::query(
                "insert into principals (name, roles, token_hash, client_cert_sha256, created_at)
                 values ($1, $2, $3, $4, $5)
                 on conflict (name) do nothing",
            )
            .bind(name)
            .bind(roles_json)
            .bind(token_hash)
            .bind(certificate)
            .bind(now_us())
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }

    pub async fn principal_by_token_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<PrincipalRow>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select name, roles, token_hash, client_cert_sha256, created_at from principals where token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await
        })?)
    }

    /// The principal bound to the client certificate of this fingerprint.
    pub async fn principal_by_certificate(
        &self,
        fingerprint: &str,
    ) -> Result<Option<PrincipalRow>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select name, roles, token_hash, client_cert_sha256, created_at from principals where client_cert_sha256 = $1",
            )
            .bind(fingerprint)
            .fetch_optional(pool)
            .await
        })?)
    }

    pub async fn list_principals(&self) -> Result<Vec<PrincipalRow>, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(
                "select name, roles, token_hash, client_cert_sha256, created_at from principals order by name",
            )
            .fetch_all(pool)
            .await
        })?)
    }

    /// Removes a principal; `false` if there was none of that name.
    pub async fn remove_principal(&self, name: &str) -> Result<bool, StoreError> {
        let done = on_db!(&self.db, |pool| {
            sqlx::query("delete from principals where name = $1")
                .bind(name)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }

    pub async fn count_principals(&self) -> Result<i64, StoreError> {
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_scalar("select count(*) from principals")
                .fetch_one(pool)
                .await
        })?)
    }
}
