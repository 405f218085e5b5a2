//! The CLIP tokenizer against ids produced by transformers' CLIPTokenizer without ftfy
//! (scripts/make_tokenizer_fixture.py), i.e. `text_cleanup: basic`, on the small vocabulary in
//! tests/fixtures/tokenizer/. The ftfy cleanup (the default) is checked in tests/io_formats/tokenizer_ftfy.rs.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use zeroconv::io::config::TextEncoderConfig;
use zeroconv::io::tokenizer::{ClipTokenizer, TextCleanup, TokenizerOptions};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn fixture() -> Value {
    let text = fs::read_to_string(fixture_dir().join("expected.json")).expect("fixture expected.json");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("an id list").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}

/// The fixture's cleanup: transformers' path without ftfy.
fn basic() -> TokenizerOptions {
    TokenizerOptions { text_cleanup: TextCleanup::Basic, ..TokenizerOptions::default() }
}

fn options(max_length: usize, pad_token: &str) -> TokenizerOptions {
    TokenizerOptions { max_length, pad_token: pad_token.to_string(), text_cleanup: TextCleanup::Basic }
}

fn from_vocab(opts: TokenizerOptions) -> ClipTokenizer {
    let dir = fixture_dir();
    ClipTokenizer::from_vocab_and_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), opts).expect("tokenizer")
}

fn cases(fixture: &Value) -> &Vec<Value> {
    fixture["cases"].as_array().expect("cases")
}

#[test]
fn fixture_covers_what_it_should() {
    let f = fixture();
    let cases = cases(&f);
    assert!(cases.len() >= 20);
    let longest = cases.iter().map(|c| c["tokens"].as_array().unwrap().len()).max().unwrap();
    assert!(longest > 75, "a caption longer than 77 tokens with BOS and EOS (longest: {longest})");
    // Captions where transformers' fast tokenizer gives other ids: matching them shows the slow behaviour.
    assert!(cases.iter().any(|c| c["fast_tokenizer_agrees"] == Value::Bool(false)));
}

#[test]
fn special_ids_match_transformers() {
    let f = fixture();
    let tok = from_vocab(basic());
    assert_eq!(u64::from(tok.bos_id()), f["bos_id"].as_u64().unwrap());
    assert_eq!(u64::from(tok.eos_id()), f["eos_id"].as_u64().unwrap());
    assert_eq!(u64::from(tok.pad_id()), f["pad_id"].as_u64().unwrap());
    assert_eq!(tok.vocab_size() as u64, f["vocab_size"].as_u64().unwrap());
    let bang = from_vocab(options(77, "!"));
    assert_eq!(u64::from(bang.pad_id()), f["pad_bang_id"].as_u64().unwrap());
}

#[test]
fn tokens_and_ids_match_transformers() {
    let f = fixture();
    let tok = from_vocab(basic());
    for case in cases(&f) {
        let text = case["text"].as_str().unwrap();
        let expected_tokens: Vec<&str> =
            case["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tok.tokenize(text), expected_tokens, "tokens of {text:?}");
        let got = tok.encode(text);
        assert_eq!(got.len(), 77);
        assert_eq!(got, ids(&case["ids"]), "ids of {text:?}");
    }
}

#[test]
fn truncation_keeps_eos_last() {
    let f = fixture();
    let tok = from_vocab(options(16, "<|endoftext|>"));
    for case in cases(&f) {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text);
        assert_eq!(got, ids(&case["ids_max_length_16"]), "ids of {text:?} at max_length 16");
        let unpadded = tok.encode_unpadded(text);
        assert!(
            unpadded.len() <= 16 && unpadded.first() == Some(&tok.bos_id()) && unpadded.last() == Some(&tok.eos_id())
        );
    }
}

#[test]
fn pad_token_is_configurable_like_sd2() {
    let f = fixture();
    let tok = from_vocab(options(77, "!"));
    for case in cases(&f) {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text), ids(&case["ids_pad_bang"]), "ids of {text:?} with pad_token \"!\"");
    }
}

#[test]
fn tokenizer_json_and_directory_load_the_same_tokenizer() {
    let f = fixture();
    let from_json =
        ClipTokenizer::from_tokenizer_json(&fixture_dir().join("tokenizer.json"), basic()).expect("tokenizer.json");
    let from_dir = ClipTokenizer::from_path(&fixture_dir(), basic()).expect("directory");
    for case in cases(&f) {
        let text = case["text"].as_str().unwrap();
        assert_eq!(from_json.encode(text), ids(&case["ids"]), "tokenizer.json ids of {text:?}");
        assert_eq!(from_dir.encode(text), ids(&case["ids"]), "directory ids of {text:?}");
    }
}

#[test]
fn from_config_uses_the_tokenizer_key() {
    let config = TextEncoderConfig { tokenizer: Some(fixture_dir()), max_length: 16, ..TextEncoderConfig::default() };
    let tok = ClipTokenizer::from_config(&config).expect("tokenizer from config");
    assert_eq!(tok.max_length(), 16);
    let err = ClipTokenizer::from_config(&TextEncoderConfig::default()).err().expect("no local files").to_string();
    assert!(err.contains("model.cond_stage_config.tokenizer"), "{err}");
}

#[test]
fn batch_and_decode() {
    let tok = from_vocab(basic());
    let batch = tok.encode_batch(&["a photo of a cat", "two dogs"]);
    assert_eq!(batch.len(), 2 * 77);
    assert_eq!(&batch[..77], tok.encode("a photo of a cat").as_slice());
    assert_eq!(tok.decode(&tok.encode("A photo of a cat, high quality!")), "a photo of a cat , high quality !");
    assert_eq!(tok.decode(&tok.encode("Café naïve")), "café naïve");
}

#[test]
fn bad_files_give_clear_errors() {
    let scratch = tempfile::Builder::new().prefix("zeroconv-tokenizer-").tempdir().unwrap();
    let dir = scratch.path();
    let vocab = fixture_dir().join("vocab.json");

    let merges = dir.join("merges.txt");
    fs::write(&merges, "#version: 0.2\na b\nthree parts here\n").unwrap();
    let err = ClipTokenizer::from_vocab_and_merges(&vocab, &merges, TokenizerOptions::default()).err().unwrap();
    assert!(err.to_string().contains("line 3: expected two symbols"), "{err}");

    let bad_vocab = dir.join("vocab.json");
    fs::write(&bad_vocab, "[1, 2]").unwrap();
    let err = ClipTokenizer::from_vocab_and_merges(&bad_vocab, &merges, TokenizerOptions::default()).err().unwrap();
    assert!(err.to_string().contains("not a vocab.json"), "{err}");

    let json = dir.join("tokenizer.json");
    fs::write(&json, r#"{"model": {"type": "WordPiece", "vocab": {}, "merges": []}}"#).unwrap();
    let err = ClipTokenizer::from_tokenizer_json(&json, TokenizerOptions::default()).err().unwrap();
    assert!(err.to_string().contains("not a CLIP tokenizer"), "{err}");

    let missing = ClipTokenizer::from_path(&dir.join("nowhere"), TokenizerOptions::default()).err().unwrap();
    assert!(missing.to_string().contains("no tokenizer here"), "{missing}");

    let dir_merges = fixture_dir().join("merges.txt");
    let err = ClipTokenizer::from_vocab_and_merges(&vocab, &dir_merges, options(77, "<pad>")).err().unwrap();
    assert!(err.to_string().contains("no pad token \"<pad>\""), "{err}");
    let err = ClipTokenizer::from_vocab_and_merges(&vocab, &dir_merges, options(1, "!")).err().unwrap();
    assert!(err.to_string().contains("at least 2"), "{err}");
}

/// `zeroconv tokenize --json` with `text_cleanup=basic` prints, for the fixture tokenizer, the ids and tokens
/// transformers' slow CLIPTokenizer without ftfy gives (expected.json), unpadded, and says when max_length cut a
/// caption.
#[test]
fn the_tokenize_command_prints_transformers_ids_and_tokens() {
    let expected = fixture();
    let dir = fixture_dir();
    let set = format!("model.cond_stage_config.tokenizer={}", dir.display());
    // A command-line argument cannot hold a NUL byte: those cases are checked by the library tests above.
    let cases: Vec<&Value> =
        expected["cases"].as_array().unwrap().iter().filter(|c| !c["text"].as_str().unwrap().contains('\0')).collect();
    assert!(cases.len() >= 10, "{} cases", cases.len());
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    // The built-in tiny config's text encoder takes 16 positions: the fixture's ids at max_length 16.
    let version = "model.cond_stage_config.version=openai/clip-vit-large-patch14";
    let cleanup = "model.cond_stage_config.text_cleanup=basic";
    let mut args = vec!["tokenize", "--json", "--set", &set, "--set", version, "--set", cleanup, "--"];
    args.extend(&texts);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zeroconv")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len());
    let pad = expected["pad_id"].as_u64().unwrap();
    for (line, case) in lines.iter().zip(cases) {
        let text = case["text"].as_str().unwrap();
        assert_eq!(line["text"], case["text"]);
        // transformers pads to max_length with the pad id; the command prints the ids before padding.
        let padded = case["ids_max_length_16"].as_array().unwrap();
        let mut want: Vec<u64> = padded.iter().map(|v| v.as_u64().unwrap()).collect();
        let got: Vec<u64> = line["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        want.truncate(got.len());
        assert_eq!(got, want, "ids of {text:?}");
        assert!(padded[got.len()..].iter().all(|v| v.as_u64() == Some(pad)), "{text:?}");
        let all = case["tokens"].as_array().unwrap();
        assert_eq!(line["truncated"].as_bool().unwrap(), all.len() > got.len() - 2, "{text:?}");
        assert_eq!(line["tokens"].as_array().unwrap()[..], all[..got.len() - 2], "tokens of {text:?}");
    }
}
