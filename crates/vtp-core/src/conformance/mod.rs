//! Conformance suites: the behaviour every [`crate::JobStore`] and
//! [`crate::BlobStore`] must show, as plain async functions plus macros that
//! turn them into one `#[tokio::test]` per case.
//!
//! ```text
//! async fn store() -> Option<(Arc<dyn JobStore>, ())> {
//!     Some((Arc::new(InMemoryJobStore::new()), ()))
//! }
//! vtp_core::job_store_conformance!(store);
//! ```
//!
//! The factory must return a fresh, isolated store on every call, with a
//! guard that is dropped when the case ends (a temporary database, say).
//! `None` means the service behind the store is not available and the case
//! is skipped; factories return `None` only when the environment allows it
//! (see `vtp_storage::testing`), so a CI run with services required fails
//! instead.

pub mod blob_store;
pub mod credential_store;
pub mod job_store;
pub mod state_machine;

/// Generates one `#[tokio::test]` per [`job_store`] case, each on a fresh
/// store from the async factory `$factory`.
#[macro_export]
macro_rules! job_store_conformance {
    ($factory:path) => {
        $crate::job_store_conformance!(@cases $factory;
            create_then_get,
            get_unknown_is_not_found,
            create_twice_is_already_exists,
            idempotency_keys_are_stored_and_unique_per_owner,
            list_filters_pages_and_orders,
            transition_is_compare_and_set,
            concurrent_transitions_have_one_winner,
            stale_revision_is_a_conflict,
            updates_are_idempotent_by_seq,
            older_update_after_newer_changes_nothing,
            reordered_epochs_are_all_recorded,
            terminal_job_refuses_updates,
            metrics_are_ordered_and_upserted,
            concurrent_updates_apply_once_each,
            concurrent_reports_of_many_jobs_apply_once_each,
            updates_from_a_known_version_are_checked,
            metrics_of_unknown_job_is_not_found,
            lost_attempts_are_recorded_and_relaunched_then_fail,
            every_change_is_an_event_numbered_by_revision,
            the_queue_runs_by_priority_then_fair_share_then_age,
            quotas_hold_under_concurrent_writes,
            pages_visit_every_job_once,
            delete_removes_the_job_and_everything_with_it,
            finished_jobs_are_found_by_when_they_finished,
            ping_succeeds,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn random_histories_keep_the_invariants() {
            let Some((store, _guard)) = $factory().await else { return };
            $crate::conformance::state_machine::random_histories_keep_the_invariants(store).await;
        }
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((store, _guard)) = $factory().await else { return };
                $crate::conformance::job_store::$case(store).await;
            }
        )*
    };
}

/// Every [`blob_store`] case, once: calls the macro in brackets with the
/// given tokens followed by the case names. [`blob_store_conformance!`] and
/// [`blob_store::run_all`] both take their list from here.
#[doc(hidden)]
#[macro_export]
macro_rules! __blob_store_cases {
    ([$($callback:tt)+] $($args:tt)*) => {
        $($callback)+! { $($args)*
            put_then_get,
            missing_object_is_not_found,
            large_upload_streams_in_parts,
            failed_upload_leaves_nothing,
            failed_overwrite_keeps_previous,
            list_is_recursive_sorted_and_segment_aware,
            copy_and_delete,
            uris_round_trip,
            download_prefix_keeps_layout,
        }
    };
}

/// Generates one `#[tokio::test]` per [`blob_store`] case, each on a fresh
/// store from the async factory `$factory`.
#[macro_export]
macro_rules! blob_store_conformance {
    ($factory:path) => {
        $crate::__blob_store_cases!([$crate::blob_store_conformance] @cases $factory;);
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((store, _guard)) = $factory().await else { return };
                $crate::conformance::blob_store::$case(store).await;
            }
        )*
    };
}

/// Generates one `#[tokio::test]` per [`credential_store`] case. `$factory`
/// returns `Option<((Arc<dyn JobStore>, Arc<dyn CredentialStore>), guard)>`,
/// both stores over one fresh database.
#[macro_export]
macro_rules! credential_store_conformance {
    ($factory:path) => {
        $crate::credential_store_conformance!(@cases $factory;
            tokens_authenticate_until_revoked,
            unknown_tokens_are_refused,
            duplicate_tokens_are_refused,
            job_secrets_are_per_job_and_replaced,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((stores, _guard)) = $factory().await else { return };
                $crate::conformance::credential_store::$case(stores).await;
            }
        )*
    };
}
