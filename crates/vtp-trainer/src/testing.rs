//! Test helpers: a trainer service double that speaks the trainer's HTTP
//! contract on loopback, records what it was asked and fails on demand; and
//! a generator of small, learnable image datasets.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use vtp_core::{JobId, StartTraining};

#[derive(Debug, Default)]
struct Inner {
    started: Vec<StartTraining>,
    cancelled: Vec<JobId>,
    running: HashSet<JobId>,
    /// Statuses to answer instead of the normal reply, oldest first.
    failures: VecDeque<(StatusCode, String)>,
}

/// A running trainer double; the server stops when this is dropped.
#[derive(Debug)]
pub struct TrainerDouble {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

type Shared = Arc<Mutex<Inner>>;

fn scripted_failure(inner: &Shared) -> Option<(StatusCode, Json<serde_json::Value>)> {
    let (status, message) = inner.lock().unwrap().failures.pop_front()?;
    Some((
        status,
        Json(serde_json::json!({"error": {"code": "scripted", "message": message}})),
    ))
}

async fn start(
    State(inner): State<Shared>,
    Json(request): Json<StartTraining>,
) -> (StatusCode, Json<serde_json::Value>) {
    if let Some(failure) = scripted_failure(&inner) {
        return failure;
    }
    let mut guard = inner.lock().unwrap();
    let job_id = request.job_id;
    guard.started.push(request);
    if !guard.running.insert(job_id) {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": {"code": "conflict", "message": "already running"}})),
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "accepted", "job_id": job_id})),
    )
}

async fn cancel(
    State(inner): State<Shared>,
    Path(job_id): Path<JobId>,
) -> (StatusCode, Json<serde_json::Value>) {
    if let Some(failure) = scripted_failure(&inner) {
        return failure;
    }
    let mut guard = inner.lock().unwrap();
    guard.cancelled.push(job_id);
    if guard.running.remove(&job_id) {
        (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"status": "cancelling"})),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": {"code": "not_found", "message": "not running"}})),
        )
    }
}

async fn status(State(inner): State<Shared>, Path(job_id): Path<JobId>) -> StatusCode {
    if inner.lock().unwrap().running.contains(&job_id) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

impl TrainerDouble {
    /// Serves the double on a free loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start() -> Self {
        let inner = Shared::default();
        let app = Router::new()
            .route(
                "/health",
                // As many slots as a test may fill: the backend's queue
                // hands it every job at once.
                get(|| async { Json(serde_json::json!({"status": "ok", "slots": 1024})) }),
            )
            .route("/training/start", post(start))
            .route("/training/{job_id}/cancel", post(cancel))
            .route("/training/{job_id}", get(status))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TrainerDouble { addr, inner, task }
    }

    /// The double's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every start request received, in order (refused ones included).
    pub fn started(&self) -> Vec<StartTraining> {
        self.inner.lock().unwrap().started.clone()
    }

    /// The start requests once there are at least `n`: a backend's queue
    /// launches a started job a moment after the start is answered.
    ///
    /// # Panics
    /// When fewer than `n` arrive within 20 seconds.
    pub async fn wait_started(&self, n: usize) -> Vec<StartTraining> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let started = self.started();
            if started.len() >= n {
                return started;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} start requests arrived, not {n}",
                started.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// Every cancel request received, in order.
    pub fn cancelled(&self) -> Vec<JobId> {
        self.inner.lock().unwrap().cancelled.clone()
    }

    /// Answers the next request with `status` and `message` instead.
    pub fn fail_next(&self, status: u16, message: &str) {
        let status = StatusCode::from_u16(status).expect("a valid status code");
        self.inner
            .lock()
            .unwrap()
            .failures
            .push_back((status, message.to_owned()));
    }

    /// Marks `job_id` as running here.
    pub fn hold(&self, job_id: JobId) {
        self.inner.lock().unwrap().running.insert(job_id);
    }

    /// Forgets every job, as a restarted trainer would.
    pub fn forget_all(&self) {
        self.inner.lock().unwrap().running.clear();
    }

    /// Stops serving; later requests find nothing listening.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TrainerDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes an ImageFolder of three visually distinct classes with noise
/// (`disc`, `square`, `stripes`; 24x24, PNG and JPEG alternating) under `dir`.
///
/// # Panics
/// On I/O errors.
pub fn shapes_dataset(dir: &std::path::Path, per_class: usize, seed: u64) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (class, name) in ["disc", "square", "stripes"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        for i in 0..per_class {
            let (cx, cy): (i32, i32) = (rng.random_range(9..15), rng.random_range(9..15));
            let colour = [
                rng.random_range(150..255u8),
                rng.random_range(150..255u8),
                rng.random_range(150..255u8),
            ];
            let mut noise =
                rand::rngs::StdRng::seed_from_u64(seed * 1000 + (class * per_class + i) as u64);
            let img = image::RgbImage::from_fn(24, 24, |x, y| {
                let (dx, dy) = (x as i32 - cx, y as i32 - cy);
                let on = match class {
                    0 => dx * dx + dy * dy <= 25,
                    1 => dx.abs().max(dy.abs()) == 6 || dx.abs().max(dy.abs()) == 5,
                    _ => y % 6 < 3,
                };
                let n = noise.random_range(0..40u8);
                if on {
                    image::Rgb(colour.map(|c| c.saturating_sub(n)))
                } else {
                    image::Rgb([n, n, n])
                }
            });
            let path = dir
                .join(name)
                .join(format!("{i}.{}", if i % 2 == 0 { "png" } else { "jpg" }));
            img.save(path).unwrap();
        }
    }
}

/// Zips every file under `dir` into `archive`, paths relative to `dir`'s parent
/// (so the archive holds one top-level folder).
///
/// # Panics
/// On I/O errors.
pub fn zip_dir(dir: &std::path::Path, archive: &std::path::Path) {
    use std::io::Write;
    let base = dir.parent().unwrap();
    let mut writer = zip::ZipWriter::new(std::fs::File::create(archive).unwrap());
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path)
            } else {
                files.push(path)
            }
        }
    }
    files.sort();
    for path in files {
        let name = path
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        writer
            .start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(&std::fs::read(&path).unwrap()).unwrap();
    }
    writer.finish().unwrap();
}

/// Class names of [`yolo_shapes_dataset`], in index order.
pub const YOLO_SHAPES_CLASSES: [&str; 3] = ["square", "circle", "triangle"];

/// Writes a YOLO detection dataset in the Ultralytics layout under
/// `dir/yolo-shapes` and returns that folder: `data.yaml`,
/// `images/{train,val}` and `labels/{train,val}`. Each PNG scene holds 1-4
/// non-overlapping objects of three classes, each in its own colour (red
/// filled squares, green filled circles, blue triangles) of varied size and
/// place, on a dark grey background that is plain or noisy; a third of the
/// scenes are landscape and a third portrait (`size` × `3/4 size`). Boxes
/// are tight around the drawn pixels.
///
/// # Panics
/// On I/O errors, or a `size` below 24.
pub fn yolo_shapes_dataset(
    dir: &std::path::Path,
    train: usize,
    val: usize,
    size: u32,
    seed: u64,
) -> std::path::PathBuf {
    use rand::{RngExt, SeedableRng};
    assert!(size >= 24, "scenes need at least 24 pixels");
    let root = dir.join("yolo-shapes");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (split, count) in [("train", train), ("val", val)] {
        std::fs::create_dir_all(root.join("images").join(split)).unwrap();
        std::fs::create_dir_all(root.join("labels").join(split)).unwrap();
        for n in 0..count {
            let (w, h) = match n % 3 {
                0 => (size, size),
                1 => (size, size * 3 / 4),
                _ => (size * 3 / 4, size),
            };
            let level = rng.random_range(30..110u8);
            let noisy = rng.random_bool(0.5);
            let mut img = image::RgbImage::from_fn(w, h, |_, _| {
                if noisy {
                    image::Rgb(
                        [(); 3].map(|_| level.saturating_add(rng.random_range(0..30u8)) - 15),
                    )
                } else {
                    image::Rgb([level; 3])
                }
            });
            let mut boxes: Vec<(usize, [u32; 4])> = Vec::new();
            let objects = rng.random_range(1..=4);
            for _ in 0..objects {
                let class = rng.random_range(0..3usize);
                let side = rng.random_range((size / 6).max(6)..=size / 3);
                let colour = match class {
                    0 => [
                        rng.random_range(200..=255u8),
                        rng.random_range(20..60),
                        rng.random_range(20..60),
                    ],
                    1 => [
                        rng.random_range(20..60u8),
                        rng.random_range(190..=255),
                        rng.random_range(20..60),
                    ],
                    _ => [
                        rng.random_range(20..60u8),
                        rng.random_range(20..60),
                        rng.random_range(200..=255),
                    ],
                };
                // A free place: a few tries, then the object is left out.
                let place = (0..30).find_map(|_| {
                    let x = rng.random_range(1..w - side - 1);
                    let y = rng.random_range(1..h - side - 1);
                    let margin = 4;
                    let free = boxes.iter().all(|(_, [x1, y1, x2, y2])| {
                        x + side + margin <= *x1
                            || *x2 + margin <= x
                            || y + side + margin <= *y1
                            || *y2 + margin <= y
                    });
                    free.then_some((x, y))
                });
                let Some((x0, y0)) = place else { continue };
                let (mut lo, mut hi) = ([u32::MAX; 2], [0u32; 2]);
                let d = side as f32;
                for dy in 0..side {
                    for dx in 0..side {
                        let (px, py) = (dx as f32 + 0.5, dy as f32 + 0.5);
                        let on = match class {
                            0 => true,
                            1 => {
                                (px - d / 2.0).powi(2) + (py - d / 2.0).powi(2) <= (d / 2.0).powi(2)
                            }
                            _ => (px - d / 2.0).abs() <= py / 2.0,
                        };
                        if on {
                            let (x, y) = (x0 + dx, y0 + dy);
                            img.put_pixel(x, y, image::Rgb(colour));
                            lo = [lo[0].min(x), lo[1].min(y)];
                            hi = [hi[0].max(x + 1), hi[1].max(y + 1)];
                        }
                    }
                }
                boxes.push((class, [lo[0], lo[1], hi[0], hi[1]]));
            }
            let name = format!("{split}_{n:04}");
            img.save(root.join(format!("images/{split}/{name}.png")))
                .unwrap();
            let (fw, fh) = (w as f32, h as f32);
            let labels: String = boxes
                .iter()
                .map(|(class, [x1, y1, x2, y2])| {
                    format!(
                        "{class} {:.6} {:.6} {:.6} {:.6}\n",
                        (x1 + x2) as f32 / 2.0 / fw,
                        (y1 + y2) as f32 / 2.0 / fh,
                        (x2 - x1) as f32 / fw,
                        (y2 - y1) as f32 / fh,
                    )
                })
                .collect();
            std::fs::write(root.join(format!("labels/{split}/{name}.txt")), labels).unwrap();
        }
    }
    let names: String = YOLO_SHAPES_CLASSES
        .iter()
        .enumerate()
        .map(|(i, n)| format!("  {i}: {n}\n"))
        .collect();
    std::fs::write(
        root.join("data.yaml"),
        format!("path: .\ntrain: images/train\nval: images/val\nnames:\n{names}"),
    )
    .unwrap();
    root
}
