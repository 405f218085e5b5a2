//! Turning a preprocessed kernel source into a C++ translation unit for the host: `__shared__` declarations become
//! per-block storage, and a table of every `extern "C" __global__` kernel is appended so the host can launch them
//! by name with any parameter list.
//!
//! Works on tokens of the preprocessed text (macros already expanded, so kernels stamped out by macros such as
//! `ZC_FOR_EACH_FLOAT` are visible). Replacements keep the line count, so compiler messages still point at the
//! right lines of the original source through the preprocessor's line markers.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ident,
    Number,
    Literal,
    Punct,
}

#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    kind: Kind,
    text: &'a str,
    start: usize,
    end: usize,
    /// Index into `Tokens::files` and the line there, from the preprocessor's line markers.
    file: usize,
    line: usize,
}

struct Tokens<'a> {
    list: Vec<Token<'a>>,
    files: Vec<String>,
}

impl Tokens<'_> {
    fn location(&self, t: &Token) -> String {
        format!("{}:{}", self.files[t.file], t.line)
    }
}

/// Splits C++ source into identifiers, numbers, literals and one-character punctuation. Comments and
/// preprocessor lines are skipped; `# <line> "<file>"` markers set the location of the tokens that follow.
fn tokenize<'a>(src: &'a str, file_name: &str) -> Result<Tokens<'a>> {
    let bytes = src.as_bytes();
    let mut files = vec![file_name.to_string()];
    let mut list = Vec::new();
    let (mut i, mut line, mut file) = (0usize, 1usize, 0usize);
    let mut at_line_start = true;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                line += 1;
                at_line_start = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' | b'\x0c' | b'\x0b' => {
                i += 1;
                continue;
            }
            b'#' if at_line_start => {
                let end = line_end(bytes, i);
                if let Some((l, f)) = line_marker(&src[i..end]) {
                    let idx = files.iter().position(|x| *x == f).unwrap_or_else(|| {
                        files.push(f.clone());
                        files.len() - 1
                    });
                    file = idx;
                    // The marker names the number of the line after it; the newline below adds one.
                    line = l.saturating_sub(1);
                } else {
                    line += src[i..end].matches('\n').count();
                }
                i = end;
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = line_end(bytes, i);
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let close = src[i + 2..]
                    .find("*/")
                    .ok_or_else(|| Error::msg(format!("{}:{line}: unterminated comment", files[file])))?;
                line += src[i..i + 2 + close].matches('\n').count();
                i += close + 4;
                continue;
            }
            _ => {}
        }
        at_line_start = false;
        let start = i;
        let kind = if c == b'_' || c.is_ascii_alphabetic() {
            while i < bytes.len() && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric()) {
                i += 1;
            }
            Kind::Ident
        } else if c.is_ascii_digit() || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < bytes.len() {
                let d = bytes[i];
                let exponent_sign = (d == b'+' || d == b'-') && matches!(bytes[i - 1], b'e' | b'E' | b'p' | b'P');
                if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || d == b'\'' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            Kind::Number
        } else if c == b'"' || c == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                if bytes[i] == b'\n' {
                    return Err(Error::msg(format!("{}:{line}: unterminated literal", files[file])));
                }
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
            Kind::Literal
        } else {
            // One character; multi-byte UTF-8 characters are kept whole (they only occur in literals or errors).
            i += src[i..].chars().next().map_or(1, char::len_utf8);
            Kind::Punct
        };
        list.push(Token { kind, text: &src[start..i], start, end: i, file, line });
    }
    Ok(Tokens { list, files })
}

/// The end of a (possibly backslash-continued) line starting at `i`, excluding its newline.
fn line_end(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && bytes[i] != b'\n' {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
        }
        i += 1;
    }
    i
}

/// `# 12 "file.cu" 1` or `#line 12 "file.cu"` -> (12, "file.cu").
fn line_marker(text: &str) -> Option<(usize, String)> {
    let rest = text.strip_prefix('#')?.trim_start();
    let rest = rest.strip_prefix("line").unwrap_or(rest).trim_start();
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let number = rest[..digits].parse().ok()?;
    let name = rest[digits..].trim_start().strip_prefix('"')?.split('"').next()?;
    Some((number, name.to_string()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Namespace,
    ExternC,
    Other,
}

/// For each token, whether it sits directly in a namespace (or `extern "C" {}`) and whether inside
/// `extern "C" {}`, following braces.
fn scopes(t: &[Token]) -> Vec<(bool, bool)> {
    let mut stack: Vec<Scope> = Vec::new();
    let mut out = Vec::with_capacity(t.len());
    for i in 0..t.len() {
        out.push((stack.iter().all(|s| *s != Scope::Other), stack.contains(&Scope::ExternC)));
        match t[i].text {
            "{" => {
                let prev = |k: usize| i.checked_sub(k).map(|j| t[j].text);
                let kind = if prev(1) == Some("\"C\"") && prev(2) == Some("extern") {
                    Scope::ExternC
                } else if prev(1) == Some("namespace")
                    || (prev(2) == Some("namespace") && i >= 1 && t[i - 1].kind == Kind::Ident)
                {
                    Scope::Namespace
                } else {
                    Scope::Other
                };
                stack.push(kind);
            }
            "}" => {
                stack.pop();
            }
            _ => {}
        }
    }
    out
}

/// The index of the token closing the bracket opened at `open`.
fn matching(t: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (k, tok) in t.iter().enumerate().skip(open) {
        match tok.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// The `extern "C" __global__` kernels defined in `src`, in order.
fn find_kernels(tokens: &Tokens, scope: &[(bool, bool)]) -> Result<Vec<String>> {
    let t = &tokens.list;
    let mut names = Vec::new();
    for i in 0..t.len() {
        if t[i].text != "__global__" {
            continue;
        }
        let at = tokens.location(&t[i]);
        // Skip to the parameter list: the identifier just before the first '(' outside __launch_bounds__(...).
        let mut k = i + 1;
        let mut name = None;
        while k < t.len() {
            match t[k].text {
                "__launch_bounds__" => {
                    let close = t.get(k + 1).filter(|x| x.text == "(").and_then(|_| matching(t, k + 1));
                    k = close.ok_or_else(|| Error::msg(format!("{at}: malformed __launch_bounds__")))? + 1;
                    continue;
                }
                "(" => {
                    name = (t[k - 1].kind == Kind::Ident).then_some(k - 1);
                    break;
                }
                ";" | "{" | "}" => break,
                _ => k += 1,
            }
        }
        let Some(name_at) = name else {
            return Err(Error::msg(format!("{at}: cannot find the name of this __global__ function")));
        };
        let close = matching(t, k).ok_or_else(|| Error::msg(format!("{at}: unbalanced parameter list of a kernel")))?;
        let is_definition = t.get(close + 1).is_some_and(|x| x.text == "{");
        if !is_definition {
            continue; // a declaration; the definition registers the kernel
        }
        let kernel = t[name_at].text;
        let extern_c = (i >= 2 && t[i - 1].text == "\"C\"" && t[i - 2].text == "extern") || scope[i].1;
        if !extern_c || !scope[i].0 {
            return Err(Error::msg(format!(
                "{at}: kernel `{kernel}` is not an extern \"C\" function at namespace scope; kernels are looked up \
                 by their C name (declare it `extern \"C\" __global__ void {kernel}(...)`)"
            )));
        }
        if !t[i + 1..name_at].iter().any(|x| x.text == "void") {
            return Err(Error::msg(format!("{at}: kernel `{kernel}` must return void")));
        }
        names.push(kernel.to_string());
    }
    Ok(names)
}

/// One `__shared__` declaration, rewritten: the replacement text for the byte range `start..end`.
struct Rewrite {
    start: usize,
    end: usize,
    text: String,
}

fn text_of(src: &str, t: &[Token]) -> String {
    match (t.first(), t.last()) {
        (Some(a), Some(b)) => src[a.start..b.end].to_string(),
        _ => String::new(),
    }
}

/// Rewrites the `__shared__` declaration at token `i` (see `cuda_emu.h`, `SharedVar`).
fn rewrite_shared(
    src: &str,
    tokens: &Tokens,
    scope: &[(bool, bool)],
    i: usize,
    counter: &mut usize,
) -> Result<Rewrite> {
    let t = &tokens.list;
    let at = tokens.location(&t[i]);
    let prev = i.checked_sub(1).map(|j| t[j].text);
    let dynamic = prev == Some("extern");
    let first = if dynamic || prev == Some("static") { i - 1 } else { i };
    if scope[i].0 {
        return Err(Error::msg(format!(
            "{at}: __shared__ variables at namespace scope are not supported by the emulator; declare them inside \
             the kernel or device function"
        )));
    }
    // The declaration runs to the ';' outside any bracket.
    let mut depth = 0i32;
    let mut semi = None;
    for (k, tok) in t.iter().enumerate().skip(i + 1) {
        match tok.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth -= 1,
            ";" if depth == 0 => {
                semi = Some(k);
                break;
            }
            _ => {}
        }
        if depth < 0 {
            break;
        }
    }
    let semi = semi.ok_or_else(|| Error::msg(format!("{at}: cannot find the end of this __shared__ declaration")))?;

    // Drop `__align__(n)`, remembering n.
    let mut decl: Vec<Token> = Vec::new();
    let mut align = None;
    let mut k = i + 1;
    while k < semi {
        if t[k].text == "__align__" && t.get(k + 1).is_some_and(|x| x.text == "(") {
            let close = matching(t, k + 1).filter(|&c| c < semi);
            let close = close.ok_or_else(|| Error::msg(format!("{at}: malformed __align__")))?;
            align = Some(text_of(src, &t[k + 2..close]));
            k = close + 1;
        } else {
            decl.push(t[k]);
            k += 1;
        }
    }

    // Split declarators at top-level commas (brackets and template arguments nest).
    let mut declarators: Vec<&[Token]> = Vec::new();
    let (mut depth, mut angle, mut from) = (0i32, 0i32, 0usize);
    for (k, tok) in decl.iter().enumerate() {
        match tok.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth -= 1,
            "<" if depth == 0 => angle += 1,
            ">" if depth == 0 => angle -= 1,
            "=" if depth == 0 && angle == 0 => {
                return Err(Error::msg(format!("{at}: a __shared__ variable cannot have an initializer")));
            }
            "," if depth == 0 && angle == 0 => {
                declarators.push(&decl[from..k]);
                from = k + 1;
            }
            _ => {}
        }
    }
    declarators.push(&decl[from..]);

    let mut base = String::new();
    let mut out = String::new();
    for (n, d) in declarators.iter().enumerate() {
        let dims_at = d.iter().position(|x| x.text == "[").unwrap_or(d.len());
        let name_at = dims_at.checked_sub(1).filter(|&p| d[p].kind == Kind::Ident);
        let name_at = name_at.ok_or_else(|| Error::msg(format!("{at}: cannot read this __shared__ declarator")))?;
        let dims = &d[dims_at..];
        if dims.iter().any(|x| x.kind == Kind::Punct && x.text == "(") && dims.first().is_none_or(|x| x.text != "[") {
            return Err(Error::msg(format!("{at}: unsupported __shared__ declarator")));
        }
        let mut prefix = &d[..name_at];
        let mut stars = String::new();
        while let Some((last, rest)) = prefix.split_last() {
            if last.text == "*" || last.text == "&" {
                stars.insert_str(0, last.text);
                prefix = rest;
            } else {
                break;
            }
        }
        if n == 0 {
            base = text_of(src, prefix);
            if base.trim().is_empty() {
                return Err(Error::msg(format!("{at}: a __shared__ declaration without a type")));
            }
        } else if !prefix.is_empty() {
            return Err(Error::msg(format!("{at}: unsupported __shared__ declarator")));
        }
        let name = d[name_at].text;
        let dims_text = text_of(src, dims);
        if dynamic {
            // `extern __shared__ T name[];` is the launch's dynamic shared memory, seen as a T array.
            let rest = dims_text.trim_start().strip_prefix('[').map(str::trim_start).and_then(|r| r.strip_prefix(']'));
            let rest = rest.ok_or_else(|| {
                Error::msg(format!("{at}: extern __shared__ `{name}` must be an array of unknown size (`{name}[]`)"))
            })?;
            let pointer =
                if rest.trim().is_empty() { format!("{base}{stars}*") } else { format!("{base}{stars} (*){rest}") };
            out.push_str(&format!("auto const {name} = reinterpret_cast<{pointer}>(::zc_emu::dynamic_shared()); "));
        } else {
            let storage = format!("zc_emu_shared_{counter}");
            *counter += 1;
            let ty = format!("{base}{stars}{dims_text}");
            let args = match &align {
                Some(a) => format!("{ty}, ({a})"),
                None => ty,
            };
            out.push_str(&format!(
                "static thread_local ::zc_emu::SharedVar<{args}> {storage}; auto& {name} = {storage}.get(); "
            ));
        }
    }
    let (start, end) = (t[first].start, t[semi].end);
    // Keep the line count, so later lines keep their numbers.
    out.push_str(&"\n".repeat(src[start..end].matches('\n').count()));
    Ok(Rewrite { start, end, text: out })
}

/// The translation unit the emulator compiles: `preprocessed` (the output of `g++ -E` on a kernel module) with
/// its `__shared__` declarations rewritten, after `#include "<header>"`, followed by the kernel table.
/// Returns it with the names of the kernels, in source order.
pub(crate) fn host_translation_unit(
    preprocessed: &str,
    file_name: &str,
    header: &str,
) -> Result<(String, Vec<String>)> {
    let tokens = tokenize(preprocessed, file_name)?;
    let scope = scopes(&tokens.list);
    let kernels = find_kernels(&tokens, &scope)?;
    if kernels.is_empty() {
        return Err(Error::msg(format!("{file_name}: no extern \"C\" __global__ kernel is defined")));
    }
    let mut rewrites = Vec::new();
    let mut counter = 0;
    for i in 0..tokens.list.len() {
        if tokens.list[i].text == "__shared__" {
            rewrites.push(rewrite_shared(preprocessed, &tokens, &scope, i, &mut counter)?);
        }
    }
    let mut out = String::with_capacity(preprocessed.len() + 64 * kernels.len() + 512);
    out.push_str(&format!("#include \"{header}\"\n"));
    let mut pos = 0;
    for r in &rewrites {
        out.push_str(&preprocessed[pos..r.start]);
        out.push_str(&r.text);
        pos = r.end;
    }
    out.push_str(&preprocessed[pos..]);
    out.push_str("\n// ---- generated by kernels::emulate: the kernels this module defines ----\n");
    out.push_str("static const ::zc_emu::KernelInfo zc_emu_kernel_table[] = {\n");
    for k in &kernels {
        out.push_str(&format!("    ZC_EMU_KERNEL({k}),\n"));
    }
    out.push_str("};\n");
    out.push_str(
        "extern \"C\" __attribute__((visibility(\"default\"))) const ::zc_emu::KernelInfo* \
         zc_emu_kernels(unsigned long long* count) {\n",
    );
    out.push_str(&format!("    *count = {};\n    return zc_emu_kernel_table;\n}}\n", kernels.len()));
    Ok((out, kernels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(src: &str) -> Result<(String, Vec<String>)> {
        host_translation_unit(src, "test.cu", "cuda_emu.h")
    }

    #[test]
    fn kernels_are_found_with_line_markers_and_launch_bounds() {
        let src =
            "# 1 \"a.cu\"\nextern \"C\" __global__ void first(const float* x, float* y, u64 n) { y[0] = x[0]; }\n\
                   extern \"C\" __global__ __launch_bounds__(256, 2) void second(int a) {}\n\
                   extern \"C\" __global__ void declared_only(int a);\n\
                   extern \"C\" { __global__ void inside_block() {} }\n";
        let (_, names) = unit(src).unwrap();
        assert_eq!(names, ["first", "second", "inside_block"]);
    }

    #[test]
    fn a_kernel_without_c_linkage_is_an_error_naming_file_and_line() {
        let src = "# 7 \"mod.cu\"\n\ntemplate <class T> __global__ void k(T* x) {}\n";
        let err = unit(src).unwrap_err().to_string();
        assert!(err.contains("mod.cu:8") && err.contains("`k`") && err.contains("extern \"C\""), "{err}");
    }

    #[test]
    fn a_module_without_kernels_is_an_error() {
        let err = unit("__device__ float f(float x) { return x; }\n").unwrap_err().to_string();
        assert!(err.contains("no extern \"C\" __global__ kernel"), "{err}");
    }

    #[test]
    fn static_shared_declarations_become_per_block_storage() {
        let src = "extern \"C\" __global__ void k() {\n  __shared__ float tile[32][33];\n  \
                   static __shared__ __align__(16) unsigned char raw[64], more[8];\n  __shared__ T* ptrs[4];\n  \
                   __shared__ float total;\n}\n";
        let (out, _) = unit(src).unwrap();
        assert!(out.starts_with("#include \"cuda_emu.h\"\n"));
        assert!(out.contains(
            "static thread_local ::zc_emu::SharedVar<float[32][33]> zc_emu_shared_0; auto& tile = zc_emu_shared_0.get();"
        ));
        assert!(out.contains("::zc_emu::SharedVar<unsigned char[64], (16)> zc_emu_shared_1; auto& raw ="));
        assert!(out.contains("::zc_emu::SharedVar<unsigned char[8], (16)> zc_emu_shared_2; auto& more ="));
        assert!(out.contains("::zc_emu::SharedVar<T*[4]> zc_emu_shared_3; auto& ptrs ="));
        assert!(out.contains("::zc_emu::SharedVar<float> zc_emu_shared_4; auto& total ="));
        assert!(!out.contains("__shared__"), "{out}");
        assert!(!out.contains("static static"));
        let body = out.split_once('\n').unwrap().1.split("\n// ---- generated").next().unwrap();
        assert_eq!(body.lines().count(), src.lines().count(), "line count changed:\n{out}");
    }

    #[test]
    fn dynamic_shared_memory_is_the_launch_buffer() {
        let src = "extern \"C\" __global__ void k() { extern __shared__ __align__(16) float smem[]; \
                   extern __shared__ float rows[][4]; }\n";
        let (out, _) = unit(src).unwrap();
        assert!(out.contains("auto const smem = reinterpret_cast<float*>(::zc_emu::dynamic_shared());"), "{out}");
        assert!(out.contains("auto const rows = reinterpret_cast<float (*)[4]>(::zc_emu::dynamic_shared());"));
    }

    #[test]
    fn unsupported_shared_declarations_are_reported() {
        for (src, want) in [
            ("__shared__ float g[4];\nextern \"C\" __global__ void k() {}\n", "namespace scope"),
            ("extern \"C\" __global__ void k() { __shared__ float x = 1.0f; }\n", "initializer"),
            ("extern \"C\" __global__ void k() { extern __shared__ float s[8]; }\n", "unknown size"),
        ] {
            let err = unit(src).unwrap_err().to_string();
            assert!(err.contains(want), "{src}: {err}");
        }
    }

    #[test]
    fn shared_inside_strings_and_comments_is_left_alone() {
        let src = "// __shared__ float a[1];\n/* __shared__ */ extern \"C\" __global__ void k() { \
                   const char* s = \"__shared__\"; }\n";
        let (out, _) = unit(src).unwrap();
        assert!(out.contains("\"__shared__\""));
        assert!(!out.contains("SharedVar"));
    }

    #[test]
    fn the_kernel_table_lists_every_kernel() {
        let (out, _) = unit("extern \"C\" __global__ void a() {}\nextern \"C\" __global__ void b(int) {}\n").unwrap();
        assert!(out.contains("ZC_EMU_KERNEL(a),\n    ZC_EMU_KERNEL(b),"));
        assert!(out.contains("*count = 2;"));
    }
}
