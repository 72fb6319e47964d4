//! Kernel symbol addresses from /proc/kallsyms, for the one data symbol
//! the programs need: `__per_cpu_offset[]`, to find this CPU's copy of the
//! per-CPU SNMP counters. Data symbols are listed only with
//! CONFIG_KALLSYMS_ALL (Debian enables it), and addresses read as 0 when
//! kernel.kptr_restrict hides them.

use std::{
    fs,
    io::{self, BufRead, BufReader},
};

/// Address of `symbol` in kallsyms text; `Err` says why not.
pub fn address(kallsyms: &str, symbol: &str) -> Result<u64, String> {
    for line in kallsyms.lines() {
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if name != symbol {
            continue;
        }
        let addr = u64::from_str_radix(addr, 16)
            .map_err(|_| format!("/proc/kallsyms: bad address for {symbol}: {addr}"))?;
        if addr == 0 {
            return Err(format!(
                "/proc/kallsyms hides the address of {symbol} (kernel.kptr_restrict, or \
                 missing capability CAP_SYSLOG)"
            ));
        }
        return Ok(addr);
    }
    Err(format!(
        "{symbol} is not in /proc/kallsyms (the kernel lacks CONFIG_KALLSYMS_ALL)"
    ))
}

/// Whether `symbol` is in the kernel (its address may read as 0 to a
/// process without CAP_SYSLOG; the name is there all the same).
pub fn has(kallsyms: &str, symbol: &str) -> bool {
    kallsyms
        .lines()
        .any(|line| line.split_whitespace().nth(2) == Some(symbol))
}

/// The lines of /proc/kallsyms that name one of `wanted`, in kallsyms
/// text. Read line by line and filtered: the whole file is about 5 MB
/// (120k symbols), and holding it doubled the agent's start-up peak.
pub fn read(wanted: &[&str]) -> Result<String, String> {
    let file =
        fs::File::open("/proc/kallsyms").map_err(|e| format!("cannot read /proc/kallsyms: {e}"))?;
    keep_lines(BufReader::new(file), wanted).map_err(|e| format!("cannot read /proc/kallsyms: {e}"))
}

/// The lines of `text` whose symbol name (third field) is in `wanted`.
fn keep_lines(mut text: impl BufRead, wanted: &[&str]) -> io::Result<String> {
    let mut kept = String::new();
    let mut line = String::new();
    while text.read_line(&mut line)? != 0 {
        if line
            .split_whitespace()
            .nth(2)
            .is_some_and(|name| wanted.contains(&name))
        {
            kept.push_str(&line);
            if !line.ends_with('\n') {
                kept.push('\n');
            }
        }
        line.clear();
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_data_symbols_and_explains_misses() {
        let text = "ffffffff81000000 T _stext\nffffffff82e1d8a0 D __per_cpu_offset\n\
                    ffffffffc0000000 t foo\t[mod]\n";
        assert_eq!(address(text, "__per_cpu_offset"), Ok(0xffff_ffff_82e1_d8a0));
        assert!(has(text, "foo") && has(text, "_stext"));
        assert!(!has(text, "fo") && !has(text, "mod"));
        assert!(address(text, "nope")
            .unwrap_err()
            .contains("CONFIG_KALLSYMS_ALL"));
        let hidden = "0000000000000000 D __per_cpu_offset\n";
        assert!(address(hidden, "__per_cpu_offset")
            .unwrap_err()
            .contains("kptr_restrict"));
        assert!(address("zz D __per_cpu_offset\n", "__per_cpu_offset").is_err());
        assert!(address("", "x").is_err());
    }

    #[test]
    fn keeps_only_the_wanted_lines() {
        let text = "ffffffff81000000 T _stext\nffffffff82e1d8a0 D __per_cpu_offset\n\
                    ffffffffc0000000 t foo\t[mod]\nffffffff81000010 T bpf_task_pt_regs";
        let kept = keep_lines(
            text.as_bytes(),
            &["__per_cpu_offset", "bpf_task_pt_regs", "mod"],
        )
        .unwrap();
        assert_eq!(
            kept,
            "ffffffff82e1d8a0 D __per_cpu_offset\nffffffff81000010 T bpf_task_pt_regs\n"
        );
        assert_eq!(
            address(&kept, "__per_cpu_offset"),
            Ok(0xffff_ffff_82e1_d8a0)
        );
        assert!(!has(&kept, "_stext"));
        assert_eq!(keep_lines(text.as_bytes(), &[]).unwrap(), "");
    }
}
