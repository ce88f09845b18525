//! The `/stats` chart: a bar per outcome, drawn with `plotters` into an
//! in-memory RGB buffer and encoded as PNG. Pure (no I/O, no clock).
//!
//! No text is drawn (so no font is needed): each bar's colour matches the
//! coloured square in front of its line in the embed ([`SWATCHES`]).

use crate::domain::stats::{Outcome, Outcomes};
use plotters::prelude::*;

/// Chart size in pixels.
pub const WIDTH: u32 = 480;
pub const HEIGHT: u32 = 200;
/// The first bytes of every PNG file.
pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Why the chart could not be drawn (the embed is sent without it).
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("drawing the chart failed: {0}")]
    Draw(String),
    #[error("encoding the chart failed: {0}")]
    Encode(String),
}

/// Each outcome's bar colour and the emoji square of the same colour, in
/// [`Outcome::ALL`] order.
pub const SWATCHES: [(Outcome, (u8, u8, u8), &str); 7] = [
    (Outcome::ApprovedByPolicy, (67, 160, 71), "🟩"),
    (Outcome::ApprovedByHuman, (30, 136, 229), "🟦"),
    (Outcome::DeniedByPolicy, (229, 57, 53), "🟥"),
    (Outcome::DeniedByHuman, (251, 140, 0), "🟧"),
    (Outcome::TimedOut, (253, 216, 53), "🟨"),
    (Outcome::Cancelled, (142, 36, 170), "🟪"),
    (Outcome::Pending, (120, 120, 120), "⬛"),
];

/// The emoji square of `o`'s bar.
pub fn swatch(o: Outcome) -> &'static str {
    SWATCHES
        .iter()
        .find(|(x, _, _)| *x == o)
        .map_or("▪️", |(_, _, s)| s)
}

/// A PNG bar chart of `outcomes`, one bar per outcome in [`Outcome::ALL`]
/// order, heights relative to the largest (an empty window draws only
/// the baseline).
pub fn outcome_chart(outcomes: &Outcomes) -> Result<Vec<u8>, ChartError> {
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<_>| ChartError::Draw(e.to_string());
        root.fill(&WHITE).map_err(draw)?;
        let (w, h) = (WIDTH as i32, HEIGHT as i32);
        let (margin, top) = (16, 12);
        let base = h - 16;
        let max = Outcome::ALL
            .iter()
            .map(|o| outcomes.get(*o))
            .max()
            .unwrap_or(0)
            .max(1);
        let slot = (w - 2 * margin) / SWATCHES.len() as i32;
        for (i, (o, (r, g, b), _)) in SWATCHES.iter().enumerate() {
            let n = outcomes.get(*o);
            if n == 0 {
                continue;
            }
            let height = ((base - top) as u64 * n / max) as i32;
            let x0 = margin + i as i32 * slot + slot / 8;
            let x1 = margin + (i as i32 + 1) * slot - slot / 8;
            root.draw(&Rectangle::new(
                [(x0, base - height.max(2)), (x1, base)],
                RGBColor(*r, *g, *b).filled(),
            ))
            .map_err(draw)?;
        }
        root.draw(&PathElement::new(
            vec![(margin, base), (w - margin, base)],
            BLACK.stroke_width(2),
        ))
        .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let encode = |e: png::EncodingError| ChartError::Encode(e.to_string());
    let mut writer = enc.write_header().map_err(encode)?;
    writer.write_image_data(&rgb).map_err(encode)?;
    writer.finish().map_err(encode)?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_a_png_of_the_right_size_with_one_bar_per_outcome() {
        let o = Outcomes {
            approved_by_policy: 4,
            approved_by_human: 2,
            denied_by_policy: 1,
            denied_by_human: 1,
            timed_out: 1,
            cancelled: 0,
            pending: 3,
        };
        let png_bytes = outcome_chart(&o).unwrap();
        assert_eq!(png_bytes[..8], PNG_SIGNATURE);
        let dec = png::Decoder::new(std::io::Cursor::new(&png_bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        // The tallest bar's colour is there; the empty outcome's is not.
        let has = |(r, g, b): (u8, u8, u8)| buf.chunks(3).any(|p| p == [r, g, b]);
        assert!(has(SWATCHES[0].1));
        assert!(has(SWATCHES[6].1));
        assert!(!has(SWATCHES[5].1));
        // An empty window still draws.
        assert_eq!(
            outcome_chart(&Outcomes::default()).unwrap()[..8],
            PNG_SIGNATURE
        );
    }

    #[test]
    fn every_outcome_has_a_swatch_in_order() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(SWATCHES[i].0, *o);
            assert_eq!(swatch(*o), SWATCHES[i].2);
        }
    }
}
