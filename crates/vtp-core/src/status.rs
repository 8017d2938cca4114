//! The job life cycle as an explicit state machine.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a training job is in its life.
///
/// ```text
/// pending ──start──▶ queued ──trainer──▶ running ──▶ completed
///    │                 │  │                 │  └────▶ failed
///    │                 │  └────────────────────────▶ completed | failed
///    │                 └──cancel──▶ cancelling ◀──cancel─┘
///    └──cancel──▶ cancelled ◀───────────┘   (also ──▶ completed | failed)
///
/// running ──runner lost, attempts left──▶ queued (the next attempt)
/// ```
///
/// [`JobStatus::TRANSITIONS`] is the single table of legal moves; terminal
/// states (`completed`, `failed`, `cancelled`) have none. A runner lost while
/// `queued` leaves the job `queued` with the next attempt's number
/// ([`crate::Job::end_attempt`]); trainers never report `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Created, not started.
    Pending,
    /// Handed to a launcher; the trainer has not reported yet.
    Queued,
    /// The trainer reported that it is training.
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancel requested; waiting for the trainer to stop.
    Cancelling,
    /// Stopped on request.
    Cancelled,
}

impl JobStatus {
    /// Every status, in life-cycle order.
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pending,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelling,
        JobStatus::Cancelled,
    ];

    /// The legal transitions, `(from, [to...])`. Self-transitions are not listed.
    pub const TRANSITIONS: [(JobStatus, &'static [JobStatus]); 7] = {
        use JobStatus::*;
        [
            (Pending, &[Queued, Failed, Cancelled]),
            (Queued, &[Running, Completed, Failed, Cancelling, Cancelled]),
            (Running, &[Completed, Failed, Cancelling, Queued]),
            (Cancelling, &[Cancelled, Completed, Failed]),
            (Completed, &[]),
            (Failed, &[]),
            (Cancelled, &[]),
        ]
    };

    /// The statuses reachable from `self` in one step.
    pub fn successors(self) -> &'static [JobStatus] {
        Self::TRANSITIONS
            .iter()
            .find(|(from, _)| *from == self)
            .map(|(_, to)| *to)
            .unwrap_or(&[])
    }

    /// Whether `self -> to` is in the transition table.
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        self.successors().contains(&to)
    }

    /// Checks `self -> to`, naming both ends on failure.
    pub fn check_transition(self, to: JobStatus) -> Result<()> {
        if self.can_transition_to(to) {
            Ok(())
        } else if self.is_terminal() {
            Err(Error::conflict(format!(
                "job is {self}, a final state; it cannot become {to}"
            )))
        } else {
            Err(Error::conflict(format!(
                "job cannot go from {self} to {to}"
            )))
        }
    }

    /// The status a job moves to when its trainer reports `reported`.
    ///
    /// Progress reports (`running` while running) keep the status; a trainer
    /// still reporting `running` after a cancel request leaves the job
    /// `cancelling`. Anything else must be a legal transition.
    pub fn after_report(self, reported: JobStatus) -> Result<JobStatus> {
        use JobStatus::*;
        match (self, reported) {
            (from, _) if from.is_terminal() => self.check_transition(reported).map(|()| reported),
            (Running, Running) | (Cancelling, Running) => Ok(self),
            (Cancelling, Cancelling) => Ok(self),
            (_, Pending | Queued) => Err(Error::invalid(
                "status",
                format!("a trainer cannot report {reported}"),
            )),
            _ => self.check_transition(reported).map(|()| reported),
        }
    }

    /// `completed`, `failed` and `cancelled` never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Whether a trainer may be working on the job.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobStatus::Queued | JobStatus::Running | JobStatus::Cancelling
        )
    }

    /// The lowercase wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelling => "cancelling",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "status",
                    format!(
                        "unknown status {s:?}, expected one of {}",
                        JobStatus::ALL.map(JobStatus::as_str).join(", ")
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_status() -> impl Strategy<Value = JobStatus> {
        proptest::sample::select(JobStatus::ALL.to_vec())
    }

    #[test]
    fn table_covers_every_status_once() {
        for status in JobStatus::ALL {
            let rows = JobStatus::TRANSITIONS
                .iter()
                .filter(|(from, _)| *from == status)
                .count();
            assert_eq!(rows, 1, "{status} must have exactly one row");
        }
    }

    #[test]
    fn names_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{status}\""));
        }
        assert!("done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn progress_reports_keep_the_status() {
        use JobStatus::*;
        assert_eq!(Running.after_report(Running).unwrap(), Running);
        assert_eq!(Cancelling.after_report(Running).unwrap(), Cancelling);
        assert_eq!(Queued.after_report(Running).unwrap(), Running);
        assert_eq!(Cancelling.after_report(Cancelled).unwrap(), Cancelled);
        assert!(Running.after_report(Queued).is_err());
        assert!(Pending.after_report(Running).is_err());
    }

    proptest! {
        #[test]
        fn terminal_states_are_final(from in any_status(), to in any_status()) {
            if from.is_terminal() {
                prop_assert!(!from.can_transition_to(to));
                prop_assert!(from.after_report(to).is_err());
            }
        }

        #[test]
        fn no_path_leads_back_to_pending(path in proptest::collection::vec(any_status(), 1..12)) {
            let mut current = JobStatus::Pending;
            for next in path {
                if current.can_transition_to(next) {
                    current = next;
                    prop_assert_ne!(current, JobStatus::Pending);
                }
            }
        }

        #[test]
        fn reports_only_make_legal_moves(from in any_status(), reported in any_status()) {
            if let Ok(next) = from.after_report(reported) {
                prop_assert!(next == from || from.can_transition_to(next));
            }
        }
    }
}
