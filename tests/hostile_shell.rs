//! `shell` stages under attack: a parameter that is shell syntax, and a cache whose path has spaces and
//! quotes (Colab's "My Drive"). Nothing outside the cache may change, values arrive as plain data, and
//! the outputs land inside the cache.

mod common;

#[test]
fn placeholder_values_are_data_wherever_they_stand_in_a_script() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A sentinel beside the cache; the old unquoted `> {out}/x.txt` with a cache path "a b/…" wrote to "a".
    let sentinel = d.join("sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("keep.txt"), "untouched").unwrap();
    std::fs::write(d.join("My"), "a file the split path would have truncated").unwrap();
    let before = (
        common::snapshot(&sentinel, &sentinel.join("cache")),
        std::fs::read(d.join("My")).unwrap(),
    );

    let pwn = sentinel.join("pwned");
    let attack = format!(
        "x; touch {0}; $(touch {0}) `touch {0}` ' \" \\ $HOME * {{}}",
        pwn.display()
    );
    // In TOML a literal string cannot hold ', so write the value as a basic string.
    let value = attack.replace('\\', "\\\\").replace('"', "\\\"");
    common::write(
        &d.join("p.toml"),
        &format!(
            r#"[pipeline]
name = "hostile"

[stages.a]
kind = "command"
params = {{ p = "{value}" }}
outs = ["plain.txt", "double.txt", "single.txt", "subst.txt", "heredoc.txt", "out.txt"]
shell = """
printf '%s' {{p}} > {{out}}/plain.txt
printf '%s' "{{p}}" > "{{out}}/double.txt"
printf '%s' '{{p}}' > '{{out}}'/single.txt
printf '%s' "$(printf '%s' {{p}})" > {{out}}/subst.txt
cat <<EOF > {{out}}/heredoc.txt
{{p}}
EOF
echo {{out}} > {{out}}/out.txt
"""
"#
        ),
    );
    let cache = d.join("My Drive/it's \"the\" cache");
    let out = common::saeflow(d)
        .args(["--cache", cache.to_str().unwrap(), "run", "p.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));

    assert_eq!(
        (
            common::snapshot(&sentinel, &sentinel.join("cache")),
            std::fs::read(d.join("My")).unwrap()
        ),
        before,
        "something outside the cache changed"
    );
    assert!(!pwn.exists());
    let object = std::fs::read_dir(cache.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("plain.txt").exists())
        .expect("the stage's object is in the cache");
    for file in ["plain.txt", "double.txt", "single.txt", "subst.txt"] {
        assert_eq!(
            std::fs::read_to_string(object.join(file)).unwrap(),
            attack,
            "{file}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(object.join("heredoc.txt")).unwrap(),
        format!("{attack}\n")
    );
    // `{out}` was the stage's temp dir inside the cache, one word despite its spaces and quotes.
    let written = std::fs::read_to_string(object.join("out.txt")).unwrap();
    assert!(
        written.starts_with(&format!("{}/tmp/", cache.display())),
        "{written}"
    );
}

#[test]
fn a_placeholder_the_shell_would_not_expand_is_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::write(
        &d.join("p.toml"),
        "[pipeline]\nname = \"h\"\n[stages.a]\nkind = \"command\"\nshell = \"cat <<'EOF' > x\\n{out}\\nEOF\"\n",
    );
    let out = common::run(d, &["run", "p.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));
    let text = common::text(&out);
    assert!(
        text.contains("p.toml") && text.contains("here-document"),
        "{text}"
    );
}

#[test]
fn a_symlink_or_fifo_among_a_stages_outputs_is_refused_and_nothing_is_published() {
    for (script, says) in [
        (
            "ln -s {victim} {out}/x.txt",
            "output `x.txt` is a symbolic link (to `VICTIM`)",
        ),
        (
            "mkdir {out}/d && ln -s / {out}/d/root",
            "output `d/root` is a symbolic link",
        ),
        ("mkfifo {out}/x.txt", "output `x.txt` is not a regular file"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let victim = d.join("sentinel/victim.txt");
        common::write(&victim, "precious");
        common::write(
            &d.join("p.toml"),
            &format!(
                "[pipeline]\nname = \"h\"\n[stages.a]\nkind = \"command\"\nparams = {{ victim = '{}' }}\nshell = '{script}'\n",
                victim.display()
            ),
        );
        let before = common::snapshot(d, &d.join("cache"));
        let out = common::run(d, &["run", "p.toml"]);
        let says = says.replace("VICTIM", &victim.display().to_string());
        common::assert_clean_failure(&out, d, 1, &["FAILED a", &says]);
        assert_eq!(common::snapshot(d, &d.join("cache")), before, "{script}");
        assert_eq!(std::fs::read_dir(d.join("cache/tmp")).unwrap().count(), 0);
    }
}
