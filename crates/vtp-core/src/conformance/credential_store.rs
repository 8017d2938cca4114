//! The [`CredentialStore`] conformance cases. Each takes the job store and
//! the credential store of one database.
#![allow(missing_docs, clippy::missing_panics_doc)]

use std::sync::Arc;

use crate::Error;
use crate::auth::{CredentialStore, CredentialStoreExt, NewToken, hash_token};
use crate::callback_signature::CallbackSecret;
use crate::job::{JobId, NewJob};
use crate::job_store::{JobStore, JobStoreExt};

type Stores = (Arc<dyn JobStore>, Arc<dyn CredentialStore>);

pub async fn tokens_authenticate_until_revoked((_, creds): Stores) {
    let alice = creds.create_token("alice", false).await.unwrap();
    let admin = creds.create_token("root", true).await.unwrap();
    let who = creds.authenticate(&alice.token).await.unwrap();
    assert_eq!((who.user_id.as_str(), who.admin), ("alice", false));
    assert!(creds.authenticate(&admin.token).await.unwrap().admin);

    let stored = creds
        .token_by_hash(&hash_token(&alice.token))
        .await
        .unwrap();
    assert_eq!(
        stored.as_ref(),
        Some(&alice.record),
        "the record reads back unchanged"
    );

    let revoked = creds.revoke_token(&alice.record.id).await.unwrap();
    let first = revoked.revoked_at.expect("revoked_at is stamped");
    let again = creds.revoke_token(&alice.record.id).await.unwrap();
    assert_eq!(
        again.revoked_at,
        Some(first),
        "revoking twice keeps the first stamp"
    );
    let err = creds.authenticate(&alice.token).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    creds.authenticate(&admin.token).await.unwrap();

    let listed = creds.list_tokens().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|t| !t.hash.is_empty()));
}

pub async fn unknown_tokens_are_refused((_, creds): Stores) {
    for token in [
        "",
        "vtp_",
        "Bearer x",
        "vtp_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let err = creds.authenticate(token).await.unwrap_err();
        assert!(
            matches!(err, Error::Unauthenticated { .. }),
            "{token:?}: {err:?}"
        );
    }
    let err = creds.revoke_token("tok_missing").await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "token", .. }),
        "{err:?}"
    );
}

pub async fn duplicate_tokens_are_refused((_, creds): Stores) {
    let token = NewToken::generate("alice", false).unwrap();
    creds.insert_token(&token.record).await.unwrap();
    let err = creds.insert_token(&token.record).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
}

pub async fn job_secrets_are_per_job_and_replaced((jobs, creds): Stores) {
    let new = |user: &str| NewJob {
        user_id: user.into(),
        model_name: "resnet18".into(),
        framework: "tch".into(),
        dataset_s3_uri: "s3://datasets/users/a/datasets/d/".into(),
        config: serde_json::json!({}),
        priority: 0,
    };
    let a = jobs.create_job(new("alice")).await.unwrap();
    let b = jobs.create_job(new("bob")).await.unwrap();
    assert_eq!(creds.job_secret(a.id).await.unwrap(), None);
    let (first, second, other) = (
        CallbackSecret::generate(),
        CallbackSecret::generate(),
        CallbackSecret::generate(),
    );
    creds.set_job_secret(a.id, &first).await.unwrap();
    creds.set_job_secret(b.id, &other).await.unwrap();
    assert_eq!(creds.job_secret(a.id).await.unwrap(), Some(first));
    creds.set_job_secret(a.id, &second).await.unwrap();
    assert_eq!(creds.job_secret(a.id).await.unwrap(), Some(second));
    assert_eq!(creds.job_secret(b.id).await.unwrap(), Some(other));
    let err = creds
        .set_job_secret(JobId::new(), &CallbackSecret::generate())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "job", .. }),
        "{err:?}"
    );

    // Insert-if-absent: the first secret stays; concurrent callers all get it.
    let c = jobs.create_job(new("carol")).await.unwrap();
    let tries: Vec<CallbackSecret> = (0..8).map(|_| CallbackSecret::generate()).collect();
    let stored = futures::future::join_all(
        tries
            .iter()
            .map(|secret| creds.job_secret_or_insert(c.id, secret)),
    )
    .await;
    let winner = stored[0].as_ref().unwrap().clone();
    assert!(tries.contains(&winner));
    for got in stored {
        assert_eq!(got.unwrap(), winner);
    }
    assert_eq!(creds.job_secret(c.id).await.unwrap(), Some(winner.clone()));
    let again = creds
        .job_secret_or_insert(c.id, &CallbackSecret::generate())
        .await
        .unwrap();
    assert_eq!(again, winner);
    let err = creds
        .job_secret_or_insert(JobId::new(), &CallbackSecret::generate())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "job", .. }),
        "{err:?}"
    );
}
