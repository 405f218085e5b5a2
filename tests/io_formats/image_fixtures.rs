//! Images as the training data holds them, written by Pillow (scripts/make_image_fixtures.py): whole, cut short and
//! with bytes after their end. zeroconv decodes exactly the files Pillow decodes (with truncated images not
//! allowed, as webdataset's decoders run it), so a sample NeMo's pipeline would skip is skipped here too, and one it
//! trains on trains here.

use std::path::PathBuf;
use zeroconv::io::data::decode::decode_rgb;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

#[test]
fn exactly_the_images_pillow_decodes_are_decoded() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("manifest.json")).unwrap()).unwrap();
    let entries = manifest.as_object().unwrap();
    assert!(entries.len() >= 13, "the fixture set is incomplete");
    let (mut refused, mut accepted, mut wrong) = (0, 0, Vec::new());
    for (name, pillow) in entries {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let ours = decode_rgb(&bytes);
        let pillow = pillow.as_bool().unwrap();
        match (&ours, pillow) {
            (Ok(img), true) => {
                assert_eq!((img.width(), img.height()), (96, 64), "{name}");
                accepted += 1;
            }
            (Err(e), false) => {
                assert!(!e.is_empty(), "{name}: an empty reason");
                refused += 1;
            }
            (Ok(_), false) => wrong.push(format!("{name}: Pillow refuses it, zeroconv decodes it")),
            (Err(e), true) => wrong.push(format!("{name}: Pillow decodes it, zeroconv refuses it: {e}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(refused >= 5 && accepted >= 7, "{refused} refused, {accepted} accepted");
}

/// Cut-short files say so, with what is missing.
#[test]
fn a_truncated_image_names_what_is_missing() {
    for (name, want) in [("third.jpg", "JPEG"), ("no-eoi.jpg", "end-of-image"), ("third.png", "PNG")] {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let err = match decode_rgb(&bytes) {
            Ok(_) => panic!("{name} decodes"),
            Err(e) => e,
        };
        assert!(err.contains("truncated") && err.contains(want), "{name}: {err}");
    }
}
