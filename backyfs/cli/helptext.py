"""The long --help texts of the repository commands (commands.py): what each does, its output and
exit codes, and examples. Kept apart so that commands.py reads as code."""

VERSION = "uid, unique uid prefix (4+ hex digits), or volume name (its latest valid version)"

BACKUP = """\
Back up SOURCE as a new version of VOLUME.

The first backup of a volume reads every allocated block (holes of sparse files are skipped
without reading them; zero blocks are never stored). Later backups are forward differentials on
the volume's latest valid version (or --parent): unchanged blocks are deduplicated by digest.
With --hints (the JSON of 'rbd diff --format json') only the hinted extents are read, and a small
random sample of the other blocks is re-read to catch a wrong diff. RBD sources (rbd:POOL/IMAGE)
take a snapshot (named backyfs-...) and diff against the parent's snapshot by themselves. An
image keeps two of them between backups, its latest valid version's and the one before: each
backup removes the snapshots no valid version needs while it reads.

A version turns valid only when all its blocks are durable. An interrupted backup leaves it
pending; running the same backup again resumes it.

examples:
  backyfs backup /dev/vg0/vm1-root vm1-root --label tier=gold
  backyfs backup rbd:rbd/vm2-disk vm2-disk --pre-snapshot 'ssh vm2 fsfreeze -f /'
  backyfs backup disk.img vm3 --hints changes.json     # rbd diff --format json output
  backyfs backup /dev/sdb vm4 --read-limit 200          # spare the production disk"""

RESTORE = """\
Restore VERSION to TARGET in parallel. Every block is checked against its digest. A missing or
corrupt block is reported with its block index and byte offset, the rest is still restored, and
the exit code is 3. A new or overwritten file is written sparse. A restore that stops part-way
(Ctrl-C, a full disk, an unreachable store) removes the file or RBD image it created, so nothing
that looks complete is left; a target it was told to overwrite is left and called incomplete. A
new file gets its name only once it is complete: until then it is .NAME.backyfs-restore-PID beside
it, which is all a restore killed outright (kill -9, a power cut) can leave.

examples:
  backyfs restore vm1-root /tmp/vm1.img                 # the volume's latest valid version
  backyfs restore 3f2a9c1e /dev/vg0/vm1-new --force     # a version by uid prefix, onto a device
  backyfs restore vm2-disk rbd:rbd/vm2-restored         # a new RBD image (--force overwrites)"""

SCRUB = """\
scrub checks that each object the version(s) reference exists with the recorded size;
deep-scrub reads, decodes and hashes each one. Bad objects are named with the versions, block
indices and offsets that use them, and those versions are marked invalid (exit code 3). Backing
up the same data again writes a good copy and heals them; a later full scrub marks the
versions valid again.

deep-scrub also checks the metadata database itself (SQLite's quick_check) and each version's
copy of its metadata and block map in the store, which 'rebuild-db' recovers from: a damaged
copy is written again; a missing one (an rm interrupted half-way?) is reported (exit code 3).

examples:
  backyfs scrub --all                                   # cheap: sizes only, e.g. daily
  backyfs deep-scrub --all --percent 5                  # a random 5% of the objects, e.g. weekly
  backyfs deep-scrub vm1-root                           # every block of one version"""

GC = """\
Delete stored blocks that no version references, in two phases so it is safe while backups run:
a run condemns unreferenced blocks (new backups then write them again instead of relying on
them), and a later run deletes condemned blocks that are still unreferenced once every backup
that started before the condemnation has finished. Run it twice, some time apart, e.g. daily.
While a backup runs on this repository, gc only condemns. Hosts sharing one store (each with its
own database) share blocks too: a gc that finds versions in the store its database does not know
deletes nothing; run it where one database knows every version (rebuild-db makes one). A
metadata database that fails SQLite's quick_check is refused: a damaged index can hide versions.

examples:
  backyfs prune --keep-daily 7 --keep-weekly 4 && backyfs gc
  backyfs gc --dry-run                                  # count only"""

PRUNE = """\
Remove the valid, unprotected versions of each volume (or of VOLUME) that no --keep-* rule keeps.
Rules add up: --keep-last N keeps the N newest versions; --keep-daily N keeps the newest version
of each of the last N days that have one (local time), and --keep-weekly (ISO weeks) and
--keep-monthly likewise. Pending and invalid versions are never removed here. Removing a version
frees nothing by itself: run gc afterwards. Jobs prune by their own keep policy after each good
run ([jobs.NAME] keep = {...} in the config).

examples:
  backyfs prune --keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
  backyfs prune vm1-root --keep-last 10"""

INIT = """\
Create the data directory, the store and the metadata database of the configuration (--config,
$BACKYFS_CONFIG, or the embedded default: everything in $BACKYFS_DATA_DIR). A first backup (or
rebuild-db) does this too; the commands that read a repository refuse a data directory without one,
so that a mistyped path does not look like lost backups. Use init ahead of time, e.g. to check an
S3 or RADOS configuration."""

LS = """\
List versions, oldest first: uid, volume, creation time, state (valid; pending while a backup
runs or after one was interrupted; invalid when a scrub found bad blocks), a P after the state
for protected versions, size, parent and labels."""

SHOW = """\
Show one version's metadata: volume, state, size, block size, parent, RBD snapshot, labels,
the backup's statistics (bytes read, stored, deduplicated, seconds) and the allocated blocks."""

RM = """\
Remove a version by its uid (or a unique prefix; not a volume name, to avoid removing the latest
one by accident). A protected version, or one with overlays (writes made through a writable
serve or mount, see 'backyfs overlay ls'), is refused unless --force, which also discards those
overlays. Its blocks stay in the store until gc finds no other version using them."""

PROTECT = """\
Protect a version against rm and prune (unprotect lifts it). The flag is kept in the store's
copy of the version's metadata too, so rebuild-db restores it."""

UNPROTECT = """\
Lift a version's protection (see protect): rm and prune may remove it again. The store's copy of
the version's metadata is updated too."""

LABEL = """\
Set labels (KEY=VALUE) of a version, or remove them with --remove KEY; prints the labels after
the change. Labels are free-form; jobs add job=NAME.

examples:
  backyfs label 3f2a9c1e reason=before-upgrade ticket=4711
  backyfs label 3f2a9c1e --remove ticket"""

STATS = """\
Repository totals: versions, volumes, their logical size, and the objects stored and their bytes
after deduplication and compression."""

REBUILD_DB = """\
Rebuild an empty metadata database from the store alone: versions, block maps, labels,
protection and the index of stored objects are all kept in the store beside the data. Move a
lost or damaged database aside first; a filled one is refused. A version whose metadata in the
store is damaged is left out and named (exit code 3); the others are rebuilt. It refuses to run
while a backup or overlay commit runs on this repository (that run would write into the database
moved aside), and a store without backyfs versions (a mistyped bucket, pool or prefix).

examples:
  mv /var/lib/backyfs/backyfs.sqlite /var/lib/backyfs/backyfs.sqlite.broken
  backyfs rebuild-db"""
