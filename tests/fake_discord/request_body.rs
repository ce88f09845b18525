//! Request bodies (JSON and multipart/form-data).

use super::*;

pub(super) fn parse_body(
    content_type: &str,
    raw: &[u8],
) -> Result<(Value, Vec<RecordedFile>), String> {
    if content_type.starts_with("multipart/form-data") {
        let boundary = content_type
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()
            .ok_or("multipart without boundary")?
            .trim_matches('"')
            .to_string();
        let parts = parse_multipart(raw, &boundary)?;
        let mut body = Value::Null;
        let mut files = Vec::new();
        for (headers, data) in parts {
            let disposition = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-disposition"))
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let name = disposition_param(&disposition, "name").unwrap_or_default();
            if name == "payload_json" {
                body = serde_json::from_slice(&data).map_err(|e| format!("payload_json: {e}"))?;
            } else {
                let content_type = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map_or_else(
                        || "application/octet-stream".to_string(),
                        |(_, v)| v.clone(),
                    );
                files.push(RecordedFile {
                    filename: disposition_param(&disposition, "filename").unwrap_or_default(),
                    field: name,
                    content_type,
                    data,
                });
            }
        }
        return Ok((body, files));
    }
    if raw.is_empty() {
        return Ok((Value::Null, Vec::new()));
    }
    serde_json::from_slice(raw)
        .map(|v| (v, Vec::new()))
        .map_err(|e| format!("JSON: {e}"))
}

pub(super) type Part = (Vec<(String, String)>, Vec<u8>);

pub(super) fn parse_multipart(raw: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    let delim = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    let mut pos = find(raw, &delim, 0).ok_or("multipart: no opening boundary")? + delim.len();
    loop {
        if raw[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        let start = pos
            + if raw[pos..].starts_with(b"\r\n") {
                2
            } else {
                0
            };
        let next = find(raw, &delim, start).ok_or("multipart: unterminated part")?;
        let mut part = &raw[start..next];
        if part.ends_with(b"\r\n") {
            part = &part[..part.len() - 2];
        }
        let split = find(part, b"\r\n\r\n", 0).ok_or("multipart: part without header end")?;
        let headers = String::from_utf8_lossy(&part[..split])
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        parts.push((headers, part[split + 4..].to_vec()));
        pos = next + delim.len();
    }
}

pub(super) fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

pub(super) fn disposition_param(disposition: &str, key: &str) -> Option<String> {
    disposition.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}
