//! Memory-mapped scans that survive the file shrinking or changing under them.
//!
//! The scan reads a dataset through a read-only shared mapping (memmap2) because, at
//! ~6 GB/s, reading into buffers would add a copy of every byte. The known hazard of
//! mmap is SIGBUS: when another process truncates the file (`cp small.csv big.csv` opens
//! it with `O_TRUNC`), touching a mapped page past the new end raises SIGBUS, whose
//! default action ends the whole process, with every other job and client.
//!
//! So the first scan installs a process-wide SIGBUS handler (`sigaction`, `SA_SIGINFO`),
//! and every scan registers its mapping in a fixed table of slots (start, length, a
//! "faulted" flag) before reading it and removes it before unmapping it ([`ScanMap`]).
//! When a fault lies inside a registered mapping, the handler maps anonymous zero pages
//! (read-only, `MAP_FIXED`) from the faulting page to the end of that mapping, sets its
//! flag and returns: the load is retried and reads zeros. The scan checks the flag at
//! each block boundary, where it checks cancellation, and fails with
//! [`ScanError::Changed`](super::ScanError::Changed). A fault anywhere else puts back the
//! disposition found at installation (std's stack-overflow handler, or the default) and
//! returns, so the fault repeats and ends the process exactly as it did without us.
//!
//! The handler does only async-signal-safe things: atomic loads and stores on a static
//! table, and the `mmap`, `sigaction` and `raise` system calls. No allocation, no lock,
//! no logging. Its system calls only touch `errno` when they fail, and then the process
//! dies anyway.
//!
//! A rewrite in place that keeps the size raises no fault but would give sums of a mix of
//! old and new bytes, so a finished scan compares the file's size, mtime and ctime (with
//! nanoseconds) with those read before mapping, and any difference fails it the same way.
//! (The kernel stamps times from a coarse clock: a rewrite within the same few
//! milliseconds as the write before the scan can go unseen.) A file replaced by rename,
//! as uploads do, or deleted is no change: the scan keeps reading the inode it opened.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;

use libc::c_int;
use memmap2::{Mmap, MmapOptions};

/// Mappings registered at once; `--workers` is at most 1024, and each worker scans at
/// most one file at a time.
const SLOTS: usize = 1024;

/// One registered mapping. A seqlock: `seq` is odd while the slot is being written, so
/// the handler never acts on a start and a length from two different registrations.
struct Slot {
    seq: AtomicUsize,
    /// Address of the first byte; 0 when the slot is free.
    start: AtomicUsize,
    len: AtomicUsize,
    /// Set by the handler when it replaced pages of this mapping.
    faulted: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// Page size, read once at installation (`sysconf` is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(0);

/// The SIGBUS disposition found at installation, put back for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A slot held by one mapping; dropping it frees the slot.
struct Registration {
    slot: &'static Slot,
}

impl Registration {
    /// Takes a free slot for `[start, start + len)`; `None` when all are taken.
    fn new(start: usize, len: usize) -> Option<Registration> {
        for slot in TABLE.iter() {
            let seq = slot.seq.load(SeqCst);
            if seq % 2 == 1 || slot.start.load(SeqCst) != 0 {
                continue;
            }
            // Another registration may have taken it since: the exchange then fails.
            if slot
                .seq
                .compare_exchange(seq, seq + 1, SeqCst, SeqCst)
                .is_err()
            {
                continue;
            }
            slot.faulted.store(false, SeqCst);
            slot.len.store(len, SeqCst);
            slot.start.store(start, SeqCst);
            slot.seq.store(seq + 2, SeqCst);
            return Some(Registration { slot });
        }
        None
    }

    fn faulted(&self) -> &AtomicBool {
        &self.slot.faulted
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Only the holder writes a taken slot, and others skip it while `start != 0`.
        let seq = self.slot.seq.load(SeqCst);
        self.slot.seq.store(seq + 1, SeqCst);
        self.slot.start.store(0, SeqCst);
        self.slot.len.store(0, SeqCst);
        self.slot.seq.store(seq + 2, SeqCst);
    }
}

/// Installs the handler once per process.
fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    // SAFETY: `install_now` runs once, before any mapping is registered.
    match INSTALLED.get_or_init(|| unsafe { install_now() }) {
        Ok(()) => Ok(()),
        Err(code) => Err(io::Error::from_raw_os_error(*code)),
    }
}

unsafe fn install_now() -> Result<(), i32> {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    let page = libc::sysconf(libc::_SC_PAGESIZE);
    if page <= 0 {
        return Err(errno());
    }
    PAGE.store(page as usize, SeqCst);
    // Read the old disposition first, so that it is known before the handler can run.
    let mut old: libc::sigaction = std::mem::zeroed();
    if libc::sigaction(libc::SIGBUS, ptr::null(), &mut old) != 0 {
        return Err(errno());
    }
    let _ = PREVIOUS.set(old);
    let mut new: libc::sigaction = std::mem::zeroed();
    let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    new.sa_sigaction = handler as libc::sighandler_t;
    // SA_ONSTACK: run on the thread's alternate stack when it has one (std gives
    // threads one), as std's own handler does.
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    libc::sigemptyset(&mut new.sa_mask);
    if libc::sigaction(libc::SIGBUS, &new, ptr::null_mut()) != 0 {
        return Err(errno());
    }
    Ok(())
}

extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // code > 0: raised by the kernel for a fault at `addr` (kill and friends use <= 0).
    if code > 0 && rescue(addr) {
        return;
    }
    // Not ours: back to what was there before, under which the fault happens again.
    // SAFETY: a zeroed sigaction is SIG_DFL; both are valid for sigaction(2).
    unsafe {
        let dfl: libc::sigaction = std::mem::zeroed();
        let prev = PREVIOUS.get().unwrap_or(&dfl);
        libc::sigaction(sig, prev, ptr::null_mut());
        if code <= 0 {
            // Sent, not a fault: nothing repeats it, so send it again. It is blocked
            // until this handler returns, then delivered under the old disposition.
            libc::raise(sig);
        }
    }
}

/// Async-signal-safe: when `addr` lies in a registered mapping, replaces its pages from
/// `addr`'s page to its end with zero pages and sets its flag.
fn rescue(addr: usize) -> bool {
    let page = PAGE.load(SeqCst);
    if page == 0 {
        return false;
    }
    for slot in TABLE.iter() {
        let seq = slot.seq.load(SeqCst);
        if seq % 2 == 1 {
            continue;
        }
        let start = slot.start.load(SeqCst);
        let len = slot.len.load(SeqCst);
        if slot.seq.load(SeqCst) != seq || start == 0 || addr < start || addr - start >= len {
            continue;
        }
        let from = addr & !(page - 1);
        let end = (start + len).div_ceil(page) * page;
        // SAFETY: [from, end) lies within a mapping its scan registered and has not yet
        // unmapped; the scan only reads it and treats what it reads after the fault as
        // void (the flag set below makes it fail).
        let p = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                end - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        slot.faulted.store(true, SeqCst);
        return true;
    }
    false
}

/// What identifies a version of a file's content, as far as `fstat` can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub(crate) fn of(file: &File) -> io::Result<Stamp> {
        let m = file.metadata()?;
        Ok(Stamp {
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A non-empty file mapped read-only for one scan, registered with the SIGBUS handler
/// for as long as it lives.
pub(crate) struct ScanMap {
    // Fields drop in order: the registration goes before the pages are unmapped, so
    // the handler never touches an address that may already be someone else's.
    registration: Registration,
    map: Mmap,
    before: Stamp,
}

impl ScanMap {
    /// Maps the `before.size` (> 0) bytes `before` describes.
    pub(crate) fn new(file: &File, before: Stamp) -> io::Result<ScanMap> {
        install()?;
        let len = usize::try_from(before.size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        // SAFETY: the mapping is only read. The file may change under it: a truncation
        // is caught by the handler (zero pages, then an error) and a rewrite by
        // `changed`; what was read is then thrown away.
        let map = unsafe { MmapOptions::new().len(len).map(file) }?;
        let registration = Registration::new(map.as_ptr() as usize, map.len())
            .ok_or_else(|| io::Error::other("too many files are being scanned at once"))?;
        // Only a hint; failure is harmless.
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(ScanMap {
            registration,
            map,
            before,
        })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Set once part of the mapping was replaced by zeros: what the scan read is void.
    pub(crate) fn faulted(&self) -> &AtomicBool {
        self.registration.faulted()
    }

    /// After the scan: `Some(now)` when the file is not the version that was mapped
    /// (a fault, or a different size, mtime or ctime).
    pub(crate) fn changed(&self, file: &File) -> io::Result<Option<Stamp>> {
        let now = Stamp::of(file)?;
        let faulted = self.faulted().load(SeqCst);
        Ok((faulted || now != self.before).then_some(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let read = File::open(f.path()).unwrap();
        (f, read)
    }

    fn map(file: &File) -> ScanMap {
        ScanMap::new(file, Stamp::of(file).unwrap()).unwrap()
    }

    /// A volatile read, so the compiler cannot assume the bytes are still what they were.
    fn read(m: &ScanMap, at: usize) -> u8 {
        // SAFETY: `at` is within the mapping, which is alive.
        unsafe { ptr::read_volatile(m.bytes().as_ptr().add(at)) }
    }

    #[test]
    fn a_mapping_truncated_under_it_reads_zeros_and_sets_its_flag() {
        let page = 4096 * 4;
        let data: Vec<u8> = (0..page * 8).map(|i| b'a' + (i % 26) as u8).collect();
        let (tmp, file) = temp_file(&data);
        // Two scans of the same file, and one of another file that stays as it is.
        let (first, second) = (map(&file), map(&file));
        let (_other_tmp, other_file) = temp_file(&data);
        let other = map(&other_file);
        assert_ne!(first.bytes().as_ptr(), second.bytes().as_ptr());

        tmp.as_file().set_len(100).unwrap();
        for m in [&first, &second] {
            assert_eq!(
                read(m, 50),
                data[50],
                "bytes before the new end are still there"
            );
            assert_eq!(
                read(m, page * 5 + 3),
                0,
                "past the new end: zeros, no SIGBUS"
            );
            assert_eq!(read(m, page * 8 - 1), 0);
            assert!(m.faulted().load(SeqCst));
            assert_eq!(
                read(m, page * 2),
                0,
                "an earlier page faults, and reads zeros too"
            );
            let now = m.changed(&file).unwrap().expect("a change");
            assert_eq!(now.size, 100);
        }
        assert_eq!(read(&other, page * 5 + 3), data[page * 5 + 3]);
        assert!(!other.faulted().load(SeqCst));
        assert_eq!(other.changed(&other_file).unwrap(), None);
    }

    #[test]
    fn a_rewrite_in_place_of_the_same_size_is_a_change() {
        let (tmp, file) = temp_file(b"a,b\n1,2\n");
        // Back-date the file, so that the rewrite below moves mtime whatever the clock's
        // granularity.
        tmp.as_file()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        let m = map(&file);
        assert_eq!(m.changed(&file).unwrap(), None);
        std::fs::write(tmp.path(), b"a,b\n3,4\n").unwrap();
        let now = m.changed(&file).unwrap().expect("a change");
        assert_eq!(now.size, 8);
        assert!(!m.faulted().load(SeqCst));
    }

    #[test]
    fn a_mapping_is_registered_while_it_lives_and_no_longer() {
        let (_tmp, file) = temp_file(b"x\n1\n");
        let m = map(&file);
        let addr = m.bytes().as_ptr() as usize;
        assert!(TABLE.iter().any(|s| s.start.load(SeqCst) == addr));
        drop(m);
        // (Another test may map something at the same address meanwhile; unlikely.)
        assert!(TABLE.iter().all(|s| s.start.load(SeqCst) != addr));
    }

    /// Runs `child` in a forked copy of this process (which may only make system calls:
    /// it is a copy of a multi-threaded process) and returns its wait status.
    fn in_child(child: impl FnOnce() -> i32) -> c_int {
        // SAFETY: the child only runs `child`, which makes async-signal-safe calls, then
        // _exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
            if pid == 0 {
                // No core file for the crash we expect.
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::_exit(child());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    /// In a child: truncates `tmp` to nothing, then reads the byte at 32 KiB of a mapping
    /// of it at `ptr`. Its wait status (exit 3: the read gave something other than 0).
    fn truncate_and_read_in_child(tmp: &tempfile::NamedTempFile, ptr: *const u8) -> c_int {
        use std::os::fd::AsRawFd;
        let fd = tmp.as_file().as_raw_fd();
        in_child(|| {
            // SAFETY: system calls and a read of a live mapping.
            unsafe {
                if libc::ftruncate(fd, 0) != 0 {
                    return 2;
                }
                if ptr::read_volatile(ptr.add(1 << 15)) != 0 {
                    return 3;
                }
            }
            0
        })
    }

    #[test]
    fn a_fault_outside_any_registered_mapping_still_ends_the_process() {
        install().unwrap();
        let (tmp, file) = temp_file(&vec![b'x'; 1 << 16]);
        // Mapped directly, not registered: a mapping of something else in the process.
        // SAFETY: only read, in the child.
        let other = unsafe { Mmap::map(&file) }.unwrap();
        let status = truncate_and_read_in_child(&tmp, other.as_ptr());
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "the child should die of SIGBUS, wait status {status:#x}"
        );
    }

    #[test]
    fn a_registered_mapping_in_a_child_survives_and_the_child_exits_normally() {
        // The same set-up as above, but registered: the handler rescues the read.
        let (tmp, file) = temp_file(&vec![b'x'; 1 << 16]);
        let m = map(&file);
        let status = truncate_and_read_in_child(&tmp, m.bytes().as_ptr());
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "wait status {status:#x}"
        );
    }
}
