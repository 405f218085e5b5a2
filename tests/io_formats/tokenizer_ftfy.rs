//! Caption cleanup with ftfy (`text_cleanup: ftfy`, the default) and without (`basic`), against
//! tests/fixtures/tokenizer/ftfy.json, written by scripts/make_ftfy_fixture.py with transformers 4.x and ftfy
//! 6.3.1 installed: transformers' slow CLIPTokenizer's tokens and ids on both paths, `ftfy.fix_text`'s own
//! output, and ftfy's mojibake heuristic `is_bad` on every two-character string over its alphabet and on
//! pseudo-random longer strings. Every comparison is exact.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use zeroconv::io::config::{Config, TextEncoderConfig};
use zeroconv::io::tokenizer::ftfy::{fix_text, is_bad, FTFY_VERSION};
use zeroconv::io::tokenizer::{ClipTokenizer, TextCleanup, TokenizerOptions};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn fixture() -> Value {
    let text = fs::read_to_string(fixture_dir().join("ftfy.json")).expect("fixture ftfy.json");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn cases(fixture: &Value) -> &Vec<Value> {
    fixture["cases"].as_array().expect("cases")
}

fn text(value: &Value) -> &str {
    value.as_str().expect("a string")
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("an id list").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().expect("a list").iter().map(text).collect()
}

fn tokenizer(max_length: usize, text_cleanup: TextCleanup) -> ClipTokenizer {
    let dir = fixture_dir();
    let options = TokenizerOptions { max_length, text_cleanup, ..TokenizerOptions::default() };
    ClipTokenizer::from_vocab_and_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), options).expect("tokenizer")
}

/// Panics listing every mismatch (at most 10 shown), so one run shows the whole picture.
fn report(what: &str, checked: usize, failures: Vec<String>) {
    assert!(checked > 0, "nothing checked for {what}");
    assert!(
        failures.is_empty(),
        "{what}: {} of {checked} differ:\n{}",
        failures.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The fixture holds each kind of text where the two cleanups part ways, and for each the ids do differ.
#[test]
fn fixture_covers_every_difference() {
    let f = fixture();
    assert_eq!(text(&f["ftfy_version"]), FTFY_VERSION);
    assert!(text(&f["transformers_version"]).starts_with("4."));
    let cases = cases(&f);
    let kinds: BTreeSet<&str> = cases.iter().map(|c| text(&c["kind"])).collect();
    for kind in ["cjk", "emoji", "fullwidth", "ligature", "html", "mojibake", "quotes", "c1", "nbsp", "accents"] {
        assert!(kinds.contains(kind), "no {kind} caption");
    }
    for kind in ["cjk", "emoji", "fullwidth", "ligature", "html", "mojibake", "quotes", "c1"] {
        assert!(
            cases.iter().any(|c| text(&c["kind"]) == kind && c["ftfy"]["ids"] != c["basic"]["ids"]),
            "no {kind} caption whose ids differ between the cleanups"
        );
    }
    let longest = cases.iter().map(|c| c["ftfy"]["tokens"].as_array().unwrap().len()).max().unwrap();
    assert!(longest > 75, "a caption longer than 77 ids (longest: {longest})");
    assert!(f["fix_text"].as_array().unwrap().len() >= 300);
}

#[test]
fn fix_text_matches_ftfy() {
    let f = fixture();
    let mut pairs: Vec<(&str, &str)> = cases(&f).iter().map(|c| (text(&c["text"]), text(&c["fix_text"]))).collect();
    for row in f["fix_text"].as_array().unwrap() {
        pairs.push((text(&row[0]), text(&row[1])));
    }
    let mut failures = Vec::new();
    for &(input, expected) in &pairs {
        let got = fix_text(input);
        if got != expected {
            failures.push(format!("fix_text({input:?}) = {got:?}, ftfy gives {expected:?}"));
        }
    }
    report("fix_text", pairs.len(), failures);
    // The fixture does exercise the repairs: most of its mojibake strings change.
    let changed = pairs.iter().filter(|(input, expected)| input != expected).count();
    assert!(changed * 2 > pairs.len(), "{changed} of {} strings changed by ftfy", pairs.len());
}

/// Bit `i` of a base64 bitset (least significant bit first), as the generator packs them.
fn bitset(value: &Value) -> Vec<bool> {
    let bytes = decode_base64(text(value));
    (0..bytes.len() * 8).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect()
}

fn decode_base64(encoded: &str) -> Vec<u8> {
    let digit = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in encoded.trim_end_matches('=').as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(digit(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn badness_matches_ftfy_on_every_pair() {
    let f = fixture();
    let alphabet: Vec<char> = text(&f["badness"]["alphabet"]).chars().collect();
    let expected = bitset(&f["badness"]["pairs_is_bad"]);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (i, a) in alphabet.iter().enumerate() {
        for (j, b) in alphabet.iter().enumerate() {
            let pair = format!("{a}{b}");
            let want = expected[i * alphabet.len() + j];
            if is_bad(&pair) != want {
                failures.push(format!("is_bad({pair:?}): ftfy says {want}"));
            }
            checked += 1;
        }
    }
    assert!(alphabet.len() > 400 && expected.iter().filter(|&&b| b).count() > 1000);
    report("is_bad on pairs", checked, failures);
}

/// The generator's 64-bit LCG (scripts/make_ftfy_fixture.py `Lcg`).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[test]
fn badness_matches_ftfy_on_random_strings() {
    let f = fixture();
    let b = &f["badness"];
    let groups: Vec<Vec<char>> = strings(&b["groups"]).iter().map(|g| g.chars().collect()).collect();
    let count = b["random_count"].as_u64().unwrap() as usize;
    let expected = bitset(&b["random_is_bad"]);
    let mut lcg = Lcg(b["lcg_seed"].as_u64().unwrap());
    let mut failures = Vec::new();
    let mut bad = 0;
    assert!(expected.len() >= count);
    for &want in expected.iter().take(count) {
        let length = 3 + lcg.below(4);
        let s: String = (0..length)
            .map(|_| {
                let group = &groups[lcg.below(groups.len())];
                group[lcg.below(group.len())]
            })
            .collect();
        let got = is_bad(&s);
        bad += usize::from(got);
        if got != want {
            failures.push(format!("is_bad({s:?}): ftfy says {want}"));
        }
    }
    assert!(bad > count / 10 && bad < count * 9 / 10, "{bad} of {count} bad: a poor test set");
    report("is_bad on random strings", count, failures);
}

#[test]
fn tokens_and_ids_match_transformers_on_both_paths() {
    let f = fixture();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (key, cleanup) in [("ftfy", TextCleanup::Ftfy), ("basic", TextCleanup::Basic)] {
        let (full, short) = (tokenizer(77, cleanup), tokenizer(16, cleanup));
        for case in cases(&f) {
            let input = text(&case["text"]);
            let want = &case[key];
            let tokens = full.tokenize(input);
            if tokens != strings(&want["tokens"]) {
                failures.push(format!("{key} tokens of {input:?}: {tokens:?}, transformers: {}", want["tokens"]));
            }
            if full.encode(input) != ids(&want["ids"]) {
                failures.push(format!(
                    "{key} ids of {input:?}: {:?}, transformers: {}",
                    full.encode(input),
                    want["ids"]
                ));
            }
            if short.encode(input) != ids(&want["ids_16"]) {
                failures.push(format!("{key} ids of {input:?} at max_length 16 differ"));
            }
            checked += 1;
        }
    }
    report("tokenizer cases", checked, failures);
}

/// Every code point assigned in the fixture's Unicode version (14.0.0), alone: `fix_text` and the tokenizer's
/// ftfy cleanup (fix_text, whitespace collapsed, lowercased) give what Python gives. This covers ftfy's
/// character tables, NFC and lowercasing, whose Rust implementations follow a later Unicode version.
#[test]
fn every_assigned_character_alone_is_cleaned_as_in_python() {
    let json = fs::read_to_string(fixture_dir().join("ftfy_chars.json")).expect("fixture ftfy_chars.json");
    let f: Value = serde_json::from_str(&json).expect("fixture is JSON");
    assert_eq!(text(&f["ftfy_version"]), FTFY_VERSION);
    let changed: std::collections::HashMap<u32, (&str, &str)> = f["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row[0].as_u64().unwrap() as u32, (text(&row[1]), text(&row[2]))))
        .collect();
    let tok = tokenizer(77, TextCleanup::Ftfy);
    let mut failures = Vec::new();
    let mut checked = 0;
    for range in f["assigned"].as_array().unwrap() {
        let (first, last) = (range[0].as_u64().unwrap() as u32, range[1].as_u64().unwrap() as u32);
        for code in first..=last {
            let c = char::from_u32(code).expect("not a surrogate");
            let alone = c.to_string();
            let (want_fixed, want_cleaned) = changed.get(&code).copied().unwrap_or((&alone, &alone));
            let (fixed, cleaned) = (fix_text(&alone), tok.clean(&alone));
            if fixed != want_fixed || cleaned != want_cleaned {
                failures.push(format!(
                    "U+{code:04X}: fix_text {fixed:?} and cleaned {cleaned:?}, Python: {want_fixed:?} and {want_cleaned:?}"
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 250_000 && changed.len() > 1000, "{checked} characters, {} changed", changed.len());
    report("single characters", checked, failures);
}

#[test]
fn ftfy_is_the_default_cleanup_and_the_config_chooses() {
    assert_eq!(TokenizerOptions::default().text_cleanup, TextCleanup::Ftfy);
    assert_eq!(TextEncoderConfig::default().text_cleanup, TextCleanup::Ftfy);
    let config = TextEncoderConfig { tokenizer: Some(fixture_dir()), ..TextEncoderConfig::default() };
    assert_eq!(ClipTokenizer::from_config(&config).unwrap().text_cleanup(), TextCleanup::Ftfy);
    let config = TextEncoderConfig { text_cleanup: TextCleanup::Basic, ..config };
    assert_eq!(ClipTokenizer::from_config(&config).unwrap().text_cleanup(), TextCleanup::Basic);

    let yaml = "model:\n  cond_stage_config:\n    text_cleanup: basic\n";
    let parsed = Config::from_yaml_str(yaml, "test.yaml", &[]).unwrap();
    assert_eq!(parsed.model.cond_stage_config.text_cleanup, TextCleanup::Basic);
    let bad = "model:\n  cond_stage_config:\n    text_cleanup: nfkc\n";
    let err = Config::from_yaml_str(bad, "test.yaml", &[]).expect_err("refused").to_string();
    assert!(err.contains("model.cond_stage_config.text_cleanup") && err.contains("ftfy"), "{err}");
}

/// `zeroconv tokenize --json` cleans with ftfy by default and as the basic tokenizer with `text_cleanup=basic`,
/// giving transformers' ids (at the built-in tiny config's max_length of 16) on each path.
#[test]
fn the_tokenize_command_follows_text_cleanup() {
    let f = fixture();
    let set = format!("model.cond_stage_config.tokenizer={}", fixture_dir().display());
    let version = "model.cond_stage_config.version=openai/clip-vit-large-patch14";
    // A command-line argument cannot hold a NUL byte: those cases are checked by the library tests above.
    let cases: Vec<&Value> = cases(&f).iter().filter(|c| !text(&c["text"]).contains('\0')).collect();
    let texts: Vec<&str> = cases.iter().map(|c| text(&c["text"])).collect();
    for (key, extra) in [("ftfy", None), ("basic", Some("model.cond_stage_config.text_cleanup=basic"))] {
        let mut args = vec!["tokenize", "--json", "--set", &set, "--set", version];
        if let Some(extra) = extra {
            args.extend(["--set", extra]);
        }
        args.push("--");
        args.extend(&texts);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zeroconv")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<Value> =
            String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), cases.len());
        for (line, case) in lines.iter().zip(&cases) {
            let padded = ids(&case[key]["ids_16"]);
            let got = ids(&line["ids"]);
            assert_eq!(got[..], padded[..got.len()], "{key} ids of {:?}", case["text"]);
        }
    }
}
