//! Whether an encoded image is all there, decided as Pillow decides it (with truncated images not allowed, as
//! webdataset's decoders run it): a JPEG must reach its end-of-image marker after the last scan; a PNG must hold its
//! whole image data, but may lack the chunks after it (Pillow decodes a PNG whose IEND is missing or cut). Bytes
//! after the end are allowed in both (padding and appended metadata are common).

/// Fails when the JPEG ends before its end-of-image marker (FF D9), naming the offset where it ends.
pub fn check_jpeg(bytes: &[u8]) -> Result<(), String> {
    let n = bytes.len();
    let truncated = |what: &str| {
        Err(format!("truncated JPEG: the file ends at byte {n} {what}, before its end-of-image marker (FF D9)"))
    };
    if n < 2 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return Err("not a JPEG (no start-of-image marker)".into());
    }
    let mut pos = 2;
    loop {
        // Up to the next marker: fill bytes (FF FF ...) and, like libjpeg, stray bytes before it are skipped.
        while pos < n && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos + 1 < n && bytes[pos + 1] == 0xFF {
            pos += 1;
        }
        if pos + 1 >= n {
            return truncated("between segments");
        }
        let marker = bytes[pos + 1];
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length: restart markers, TEM, and a stray SOI.
            0xD0..=0xD8 | 0x01 => {
                pos += 2;
                continue;
            }
            _ => {}
        }
        if pos + 4 > n {
            return truncated(&format!("inside the header of marker FF {marker:02X}"));
        }
        let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
        if len < 2 || pos + 2 + len > n {
            return truncated(&format!("inside segment FF {marker:02X} (at byte {pos})"));
        }
        pos += 2 + len;
        if marker == 0xDA {
            // Entropy-coded data follows a start-of-scan: it runs to the next marker that is not a stuffed zero
            // (FF 00), a restart marker or fill.
            loop {
                if pos + 1 >= n {
                    return truncated("inside the image data of a scan");
                }
                if bytes[pos] == 0xFF && !matches!(bytes[pos + 1], 0x00 | 0xD0..=0xD7 | 0xFF) {
                    break;
                }
                pos += 1;
            }
        }
    }
}

/// A PNG whose chunk list stops before IEND (missing, or cut inside a chunk), as the bytes of its complete chunks
/// followed by an IEND chunk, so the decoder decides whether the image data is all there (it refuses an image
/// whose data ends early, and Pillow does too); `None` for a PNG that reaches its IEND.
pub fn png_with_end(bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    const IEND: &[u8] = b"\x00\x00\x00\x00IEND\xae\x42\x60\x82";
    if !bytes.starts_with(SIGNATURE) {
        return Err("not a PNG (no signature)".into());
    }
    let mut pos = SIGNATURE.len();
    while let Some(header) = bytes.get(pos..pos + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let end = pos.saturating_add(12).saturating_add(len);
        if end > bytes.len() {
            break;
        }
        if &header[4..8] == b"IEND" {
            return Ok(None);
        }
        pos = end;
    }
    let mut fixed = Vec::with_capacity(pos + IEND.len());
    fixed.extend_from_slice(&bytes[..pos]);
    fixed.extend_from_slice(IEND);
    Ok(Some(fixed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_markers_are_walked_to_the_end() {
        // SOI, a 4-byte APP0, SOS with entropy data holding a stuffed FF 00 and a restart marker, EOI.
        let whole = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x01, 0x02, 0xFF, 0xDA, 0x00, 0x02, 0x11, 0xFF, 0x00, 0x22, 0xFF, 0xD0,
            0x33, 0xFF, 0xD9,
        ];
        assert_eq!(check_jpeg(&whole), Ok(()));
        let mut trailing = whole.to_vec();
        trailing.extend([0, 0, 0]);
        assert_eq!(check_jpeg(&trailing), Ok(()));
        for cut in 2..whole.len() - 1 {
            let err = check_jpeg(&whole[..cut]).unwrap_err();
            assert!(err.contains("truncated JPEG") && err.contains(&format!("byte {cut}")), "cut {cut}: {err}");
        }
        assert!(check_jpeg(b"GIF89a").unwrap_err().contains("not a JPEG"));
    }

    #[test]
    fn a_png_without_its_end_gets_one() {
        let sig = b"\x89PNG\r\n\x1a\n".to_vec();
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(kind);
            c.extend_from_slice(data);
            c.extend([0, 0, 0, 0]);
            c
        };
        let body: Vec<u8> = [sig.clone(), chunk(b"IHDR", &[0; 13]), chunk(b"IDAT", &[1, 2, 3])].concat();
        let whole = [body.clone(), chunk(b"IEND", &[])].concat();
        assert_eq!(png_with_end(&whole), Ok(None));
        let fixed = png_with_end(&body).unwrap().unwrap();
        assert!(fixed.starts_with(&body) && fixed.ends_with(b"IEND\xae\x42\x60\x82"));
        // Cut inside the IDAT chunk: only the complete chunks are kept.
        let cut = png_with_end(&body[..body.len() - 2]).unwrap().unwrap();
        assert_eq!(cut.len(), sig.len() + 25 + 12);
        assert!(png_with_end(b"\xff\xd8").unwrap_err().contains("not a PNG"));
    }
}
