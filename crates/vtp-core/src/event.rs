//! A job's history as events: every change a [`crate::JobStore`] makes to a
//! job is stored with it as one [`JobEvent`], numbered by the revision the
//! change gave the job. Revisions rise by exactly one per change, so a
//! client that has seen revision `n` and asks for what came after it gets
//! every later change, none twice (`GET /training/jobs/{id}/events`, a
//! server-sent events stream whose event ids are these revisions).

use serde::{Deserialize, Serialize};

use crate::api::EpochMetrics;
use crate::job::Job;
use crate::report::TrainingMetric;
use crate::status::JobStatus;

/// What one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The job was created, or its status changed.
    Status,
    /// An epoch's metrics were recorded (the job may have moved too).
    Metrics,
    /// Anything else: progress, a message, a checkpoint, or a trainer's
    /// heartbeat that only renewed the job's lease (`updated_at`).
    Progress,
}

impl EventKind {
    /// The kind of a change that moved a job from `before` (`None`: the job
    /// was created) to `after`'s status, recording `metric`.
    pub fn of_change(
        before: Option<JobStatus>,
        after: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Self {
        match before {
            None => EventKind::Status,
            Some(_) if metric.is_some() => EventKind::Metrics,
            Some(before) if before != after.status => EventKind::Status,
            Some(_) => EventKind::Progress,
        }
    }

    /// Whether a change of this kind is history, kept in the job's event
    /// log: a status change or an epoch's metrics. Progress (a heartbeat,
    /// a step, a message) is the job's present state only: streams show
    /// its latest, and the log of a job running for days stays as long as
    /// its epochs.
    pub fn is_history(self) -> bool {
        !matches!(self, EventKind::Progress)
    }

    /// The event's name in the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Metrics => "metrics",
            EventKind::Progress => "progress",
        }
    }
}

/// One change of a job, as stored beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// The job's revision after the change: its creation's, then one more
    /// for every change. The event's id in the stream.
    pub revision: i64,
    /// What the change did.
    pub kind: EventKind,
    /// The job as the change left it, without its `config` (`null`: it
    /// never changes, and is the job's own; the event stream puts it back).
    pub job: Job,
    /// For `metrics`: the epoch's values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<EpochMetrics>,
}

impl JobEvent {
    /// The event of a change from status `before` (`None`: creation) to `after`.
    pub fn of_change(
        before: Option<JobStatus>,
        after: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Self {
        let mut job = after.clone();
        job.config = serde_json::Value::Null;
        JobEvent {
            revision: after.revision,
            kind: EventKind::of_change(before, after, metric),
            job,
            metrics: metric.cloned().map(EpochMetrics::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::NewJob;

    #[test]
    fn a_change_is_named_by_what_it_did() {
        let created = NewJob {
            user_id: "alice".into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/d.zip".into(),
            config: serde_json::json!({}),
            priority: 0,
        }
        .into_job()
        .unwrap();
        assert_eq!(
            EventKind::of_change(None, &created, None),
            EventKind::Status
        );
        let mut next = created.clone();
        next.revision += 1;
        next.progress = 0.5;
        let pending = Some(JobStatus::Pending);
        assert_eq!(
            EventKind::of_change(pending, &next, None),
            EventKind::Progress
        );
        next.status = JobStatus::Queued;
        assert_eq!(
            EventKind::of_change(pending, &next, None),
            EventKind::Status
        );
        let metric = TrainingMetric {
            job_id: next.id,
            epoch: 1,
            values: [("loss".to_owned(), 0.5)].into(),
            recorded_at: next.updated_at,
        };
        let event = JobEvent::of_change(pending, &next, Some(&metric));
        assert_eq!(event.kind, EventKind::Metrics);
        assert_eq!(event.revision, created.revision + 1);
        assert_eq!(event.metrics.unwrap().values["loss"], 0.5);
    }
}
