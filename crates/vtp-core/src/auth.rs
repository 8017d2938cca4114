//! Who is asking: API tokens, the [`Principal`] a token stands for, and the
//! [`CredentialStore`] that keeps token hashes and per-job callback secrets.
//!
//! A token is `vtp_` followed by 64 hex digits (256 random bits). It is shown
//! once, when made; the store keeps only its SHA-256, so a copy of the
//! database does not let anyone in. A token's hash is its lookup key: the
//! comparison happens inside the database index, on a value an attacker
//! cannot choose the preimage of, so no constant-time compare is needed.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::callback_signature::CallbackSecret;
use crate::error::{Error, Result};
use crate::job::{JobId, now, validate_name};

/// The prefix every API token starts with (so secret scanners can spot one).
pub const TOKEN_PREFIX: &str = "vtp_";

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The user the token was made for; owner of what it creates.
    pub user_id: String,
    /// Admins see and act on every user's objects.
    pub admin: bool,
}

impl Principal {
    /// The one user of a backend running with authentication off (loopback
    /// only): it may act for any `user_id`, as the seed's API allowed.
    pub fn local() -> Self {
        Principal {
            user_id: "local".into(),
            admin: true,
        }
    }

    /// Whether this principal may see and change an object owned by `owner`.
    pub fn may_access(&self, owner: &str) -> bool {
        self.admin || self.user_id == owner
    }
}

/// Whether `token` has the form of an API token (`vtp_` and 64 lowercase
/// hex digits): anything else is refused without a database read.
pub fn is_well_formed_token(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A stored API token: everything but the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public identifier, for listing and revoking (`tok_` + 16 hex digits).
    pub id: String,
    /// SHA-256 of the token, lowercase hex.
    pub hash: String,
    /// The user the token acts for.
    pub user_id: String,
    /// Whether it acts as an admin.
    pub admin: bool,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked; a revoked token authenticates nothing.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenRecord {
    /// The principal the token stands for.
    pub fn principal(&self) -> Principal {
        Principal {
            user_id: self.user_id.clone(),
            admin: self.admin,
        }
    }
}

/// A freshly made token: the secret to hand over once, and what to store.
pub struct NewToken {
    /// The bearer token; never stored, never logged.
    pub token: String,
    /// What the store keeps.
    pub record: TokenRecord,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("token", &"<redacted>")
            .field("record", &self.record)
            .finish()
    }
}

impl NewToken {
    /// Makes a token for `user_id`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `user_id` is not a valid name.
    pub fn generate(user_id: &str, admin: bool) -> Result<Self> {
        validate_name("user", user_id)?;
        let id: [u8; 8] = rand::rng().random();
        let token = random_token();
        Ok(NewToken {
            record: TokenRecord {
                id: format!("tok_{}", hex(&id)),
                hash: hash_token(&token),
                user_id: user_id.to_owned(),
                admin,
                created_at: now(),
                revoked_at: None,
            },
            token,
        })
    }
}

/// 256 random bits as `vtp_` and 64 hex digits: an API token, or the shared
/// token of a backend and the trainer service it starts.
pub fn random_token() -> String {
    let secret: [u8; 32] = rand::rng().random();
    format!("{TOKEN_PREFIX}{}", hex(&secret))
}

/// Compares two tokens in constant time (for shared tokens that are not
/// looked up by hash).
pub fn tokens_match(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// SHA-256 of a token, lowercase hex: what the store keeps and looks up.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Where API tokens and per-job callback secrets live; the SQL job stores
/// keep them in the same database as the jobs.
///
/// # Contract
/// - `insert_token` stores a record; `token_by_hash` finds it by its hash
///   until it is revoked, then returns `None`.
/// - `revoke_token` stamps `revoked_at` once; revoking again keeps the first stamp.
/// - `set_job_secret` replaces the job's secret; `job_secret_or_insert`
///   stores one only if the job has none, atomically, and returns the one
///   stored (so concurrent starters agree on it); `job_secret` returns the
///   current one, `None` before the first.
///
/// # Errors
/// - [`Error::NotFound`] when revoking an unknown token id, or setting the
///   secret of an unknown job.
/// - [`Error::AlreadyExists`] when a token id or hash is stored twice.
/// - [`Error::Unavailable`] when the database cannot be reached (retryable).
#[async_trait]
pub trait CredentialStore: Send + Sync + fmt::Debug + 'static {
    /// Stores a new token record.
    async fn insert_token(&self, record: &TokenRecord) -> Result<()>;

    /// The unrevoked token with this hash.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;

    /// Revokes the token with public id `id`; returns it as stored.
    async fn revoke_token(&self, id: &str) -> Result<TokenRecord>;

    /// Every token, newest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;

    /// Sets the secret that job `job_id`'s trainer signs its reports with.
    async fn set_job_secret(&self, job_id: JobId, secret: &CallbackSecret) -> Result<()>;

    /// The job's current callback secret.
    async fn job_secret(&self, job_id: JobId) -> Result<Option<CallbackSecret>>;

    /// Stores `secret` as job `job_id`'s callback secret unless it has one;
    /// returns the secret stored, `secret` or the one that was there.
    async fn job_secret_or_insert(
        &self,
        job_id: JobId,
        secret: &CallbackSecret,
    ) -> Result<CallbackSecret>;
}

/// Token lookups, for every [`CredentialStore`].
#[async_trait]
pub trait CredentialStoreExt: CredentialStore {
    /// The principal `token` stands for.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] for an unknown or revoked token; store errors.
    async fn authenticate(&self, token: &str) -> Result<Principal> {
        if !is_well_formed_token(token) {
            return Err(Error::unauthenticated("the token is not a VTP API token"));
        }
        match self.token_by_hash(&hash_token(token)).await? {
            Some(record) => Ok(record.principal()),
            None => Err(Error::unauthenticated("unknown or revoked token")),
        }
    }

    /// Makes, stores and returns a token for `user_id`.
    ///
    /// # Errors
    /// As [`NewToken::generate`] and [`CredentialStore::insert_token`].
    async fn create_token(&self, user_id: &str, admin: bool) -> Result<NewToken> {
        let token = NewToken::generate(user_id, admin)?;
        self.insert_token(&token.record).await?;
        Ok(token)
    }
}

impl<T: CredentialStore + ?Sized> CredentialStoreExt for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_only_their_hash_is_kept() {
        let a = NewToken::generate("alice", false).unwrap();
        let b = NewToken::generate("alice", false).unwrap();
        assert_ne!(a.token, b.token);
        assert!(a.token.starts_with(TOKEN_PREFIX));
        assert_eq!(a.token.len(), TOKEN_PREFIX.len() + 64);
        assert!(is_well_formed_token(&a.token));
        assert!(!is_well_formed_token("vtp_0123"));
        assert!(!is_well_formed_token(&a.token.to_uppercase()));
        assert_eq!(a.record.hash, hash_token(&a.token));
        assert!(!a.record.hash.contains(&a.token[TOKEN_PREFIX.len()..]));
        assert!(!format!("{a:?}").contains(&a.token));
        assert!(NewToken::generate("../root", true).is_err());
    }

    #[test]
    fn principals_own_their_objects_and_admins_all() {
        let alice = Principal {
            user_id: "alice".into(),
            admin: false,
        };
        assert!(alice.may_access("alice"));
        assert!(!alice.may_access("bob"));
        assert!(Principal::local().may_access("bob"));
    }
}
