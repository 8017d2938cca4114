//! Pictures of predictions: boxes drawn on images with their class and
//! score, images side by side. Labels use the public-domain 8x8 bitmap
//! glyphs of `font8x8`, so nothing (no font file) is needed at run time.

use font8x8::UnicodeFonts;
use image::imageops::FilterType;
use image::{DynamicImage, Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut};
use imageproc::rect::Rect;

use crate::engine::predict::BoxPrediction;

/// Images are scaled so that their longer side is this many pixels.
const TILE: u32 = 256;
/// Tiles per row of a contact sheet.
const COLUMNS: usize = 4;

/// A distinct colour per class (Tableau 10).
fn colour(index: usize) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 10] = [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ];
    Rgb(PALETTE[index % PALETTE.len()])
}

/// Writes `text` at `(x, y)` in 8x8 glyphs on a filled background.
fn label(image: &mut RgbImage, x: i32, y: i32, text: &str, background: Rgb<u8>) {
    let width = 8 * text.chars().count() as u32 + 2;
    draw_filled_rect_mut(image, Rect::at(x, y).of_size(width, 10), background);
    for (i, ch) in text.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
            continue;
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let px = x + 1 + 8 * i as i32 + col;
                    let py = y + 1 + row as i32;
                    if px >= 0
                        && py >= 0
                        && (px as u32) < image.width()
                        && (py as u32) < image.height()
                    {
                        image.put_pixel(px as u32, py as u32, Rgb([255, 255, 255]));
                    }
                }
            }
        }
    }
}

/// `image`, scaled so its longer side is 256 pixels, with `boxes` (in the
/// image's own pixels) drawn and labelled.
pub fn draw_boxes(image: &DynamicImage, boxes: &[BoxPrediction]) -> RgbImage {
    let scale = f64::from(TILE) / f64::from(image.width().max(image.height()).max(1));
    let (w, h) = (
        ((f64::from(image.width()) * scale).round() as u32).max(1),
        ((f64::from(image.height()) * scale).round() as u32).max(1),
    );
    // Nearest keeps small images (digits on canvases) crisp when enlarged.
    let mut out = image.resize_exact(w, h, FilterType::Nearest).to_rgb8();
    for b in boxes {
        let [x1, y1, x2, y2] = b.bbox.map(|v| (v * scale).round() as i32);
        let (bw, bh) = ((x2 - x1).max(1) as u32, (y2 - y1).max(1) as u32);
        let c = colour(b.index);
        // Two pixels wide, so the box reads at a glance.
        draw_hollow_rect_mut(&mut out, Rect::at(x1, y1).of_size(bw, bh), c);
        if bw > 2 && bh > 2 {
            draw_hollow_rect_mut(
                &mut out,
                Rect::at(x1 + 1, y1 + 1).of_size(bw - 2, bh - 2),
                c,
            );
        }
        let text = format!("{} {:.2}", b.class, b.score);
        label(&mut out, x1, (y1 - 10).max(0), &text, c);
    }
    out
}

/// The images with their boxes drawn, in a grid of four per row.
pub fn contact_sheet(images: &[DynamicImage], boxes: &[Vec<BoxPrediction>]) -> RgbImage {
    let tiles: Vec<RgbImage> = images
        .iter()
        .zip(boxes.iter().chain(std::iter::repeat(&Vec::new())))
        .map(|(image, b)| draw_boxes(image, b))
        .collect();
    let columns = tiles.len().clamp(1, COLUMNS) as u32;
    let rows = tiles.len().div_ceil(COLUMNS).max(1) as u32;
    let gap = 4;
    let mut sheet = RgbImage::from_pixel(
        columns * (TILE + gap) + gap,
        rows * (TILE + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, tile) in tiles.iter().enumerate() {
        let (col, row) = ((i % COLUMNS) as u32, (i / COLUMNS) as u32);
        image::imageops::replace(
            &mut sheet,
            tile,
            i64::from(gap + col * (TILE + gap)),
            i64::from(gap + row * (TILE + gap)),
        );
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_drawn_in_their_class_colour_where_they_are() {
        let image = DynamicImage::new_rgb8(128, 64);
        let boxes = [BoxPrediction {
            class: "7".into(),
            index: 2,
            score: 0.9,
            bbox: [32.0, 16.0, 96.0, 48.0],
        }];
        let out = draw_boxes(&image, &boxes);
        assert_eq!(out.dimensions(), (256, 128));
        // The box's left edge, scaled by 2, in class 2's colour.
        assert_eq!(*out.get_pixel(64, 64), colour(2));
        // Inside the box the image is untouched.
        assert_eq!(*out.get_pixel(128, 64), Rgb([0, 0, 0]));
        let sheet = contact_sheet(&[image.clone(), image], &[boxes.to_vec(), Vec::new()]);
        assert_eq!(sheet.dimensions(), (2 * 260 + 4, 264));
    }
}
