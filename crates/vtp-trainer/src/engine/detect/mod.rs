//! Object detection: the YOLO family (`yolov8n`, `yolo11n`, ...) built
//! natively in tch with the Ultralytics `state_dict` names, its loss
//! (task-aligned assignment, CIoU, DFL, BCE), and evaluation (NMS, COCO mAP).
//!
//! Data path: [`crate::data::yolo`] reads the dataset,
//! [`crate::data::detect_loader`] makes augmented batches, [`model`] runs
//! the network, [`loss`] trains it, [`metrics`] scores it.

pub mod anchors;
pub mod assigner;
pub mod blocks;
pub mod draw;
pub mod iou;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod nms;
pub(crate) mod train;
