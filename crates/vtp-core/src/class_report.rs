//! Validation per class: what a job's final checkpoint scored on each class,
//! as its sidecar keeps it, its trainer's final report carries it and the
//! job's JSON shows it.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Validation per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassReport {
    /// What `values` holds: `accuracy` (classify: the share of a class's
    /// validation images predicted as it) or `map` (detect: mAP50-95).
    #[schema(max_length = 64)]
    pub metric: String,
    /// The class names, in the model's order (empty in a checkpoint's
    /// sidecar, whose `class_names` hold them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 1000)]
    pub classes: Vec<String>,
    /// Per class, in the model's order; `null` for a class without
    /// validation images (ground truth).
    #[schema(max_items = 1000)]
    pub values: Vec<Option<f64>>,
    /// Classify: `confusion[true][predicted]`, validation images counted
    /// (up to [`ClassReport::MAX_CONFUSION`] classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Vec<Vec<u64>>>,
}

impl ClassReport {
    /// The most classes a report carries; a model with more reports none
    /// (its sidecar still holds every class).
    pub const MAX_CLASSES: usize = 1000;
    /// The most classes a confusion matrix is kept for.
    pub const MAX_CONFUSION: usize = 100;
    /// The longest class name a report carries.
    pub const MAX_NAME: usize = 256;

    /// This report with its class names, for a final report; `None` when
    /// there are more than [`ClassReport::MAX_CLASSES`] or a name is longer
    /// than [`ClassReport::MAX_NAME`].
    #[must_use]
    pub fn named(&self, classes: &[String]) -> Option<ClassReport> {
        let report = ClassReport {
            classes: classes.to_vec(),
            ..self.clone()
        };
        report.validate().is_ok().then_some(report)
    }

    /// Checks a reported report: its names, values and matrix agree in
    /// size and stay within the bounds.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field under `per_class`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(Error::invalid(format!("per_class.{field}"), message))
        };
        let n = self.classes.len();
        if self.metric.is_empty() || self.metric.len() > 64 {
            return bad("metric", "must be 1 to 64 characters".into());
        }
        if n == 0 || n > Self::MAX_CLASSES {
            return bad(
                "classes",
                format!("{n} classes; 1 to {} are reported", Self::MAX_CLASSES),
            );
        }
        if let Some(name) = self
            .classes
            .iter()
            .find(|c| c.is_empty() || c.len() > Self::MAX_NAME)
        {
            return bad(
                "classes",
                format!(
                    "a class name must be 1 to {} bytes, not {}",
                    Self::MAX_NAME,
                    name.len()
                ),
            );
        }
        if self.values.len() != n {
            return bad(
                "values",
                format!("{} values for {n} classes", self.values.len()),
            );
        }
        if let Some(value) = self
            .values
            .iter()
            .flatten()
            .find(|v| !(0.0..=1.0).contains(*v))
        {
            return bad("values", format!("{value} is outside 0..=1"));
        }
        if let Some(confusion) = &self.confusion
            && (n > Self::MAX_CONFUSION
                || confusion.len() != n
                || confusion.iter().any(|row| row.len() != n))
        {
            return bad(
                "confusion",
                format!(
                    "must be {n} rows of {n} counts, for at most {} classes",
                    Self::MAX_CONFUSION
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn a_named_report_validates_and_bounds_hold() {
        let report = ClassReport {
            metric: "accuracy".into(),
            classes: Vec::new(),
            values: vec![Some(0.5), None],
            confusion: Some(vec![vec![1, 1], vec![0, 0]]),
        };
        let named = report.named(&names(2)).unwrap();
        assert_eq!(named.classes, ["c0", "c1"]);
        named.validate().unwrap();
        // Sizes that disagree, values outside 0..=1, too many classes.
        assert!(report.named(&names(3)).is_none());
        let mut outside = named.clone();
        outside.values[0] = Some(1.5);
        assert!(
            outside
                .validate()
                .unwrap_err()
                .to_string()
                .contains("per_class.values")
        );
        let mut lopsided = named.clone();
        lopsided.confusion = Some(vec![vec![1, 1]]);
        assert!(
            lopsided
                .validate()
                .unwrap_err()
                .to_string()
                .contains("per_class.confusion")
        );
        let many = ClassReport {
            metric: "map".into(),
            classes: Vec::new(),
            values: vec![None; ClassReport::MAX_CLASSES + 1],
            confusion: None,
        };
        assert!(many.named(&names(ClassReport::MAX_CLASSES + 1)).is_none());
        let long = vec!["x".repeat(ClassReport::MAX_NAME + 1), "y".into()];
        assert!(report.named(&long).is_none());
    }
}
