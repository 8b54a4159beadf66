# qcow2fuse — plain Makefile.  `make` builds build/qcow2fuse; `make check` runs
# every unit and integration test (after `make deps`, which installs what
# is missing); `make check SANITIZE=1` does the same with ASan+UBSan in a
# separate build tree, SANITIZE=thread with ThreadSanitizer.

VERSION   := 0.1.0
PREFIX    ?= /usr/local
DESTDIR   ?=
CC        ?= cc
PKGS      := fuse3 zlib libzstd liburing

ifeq ($(SANITIZE),1)
BUILD     ?= build/sanitize
SANFLAGS  := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else ifeq ($(SANITIZE),thread)
BUILD     ?= build/tsan
SANFLAGS  := -fsanitize=thread
else
BUILD     ?= build
SANFLAGS  :=
endif

WARN      := -Wall -Wextra -Wshadow -Wpointer-arith -Wstrict-prototypes \
             -Wmissing-prototypes -Wformat=2 -Wvla -Wno-unused-parameter
CFLAGS    ?= -O2 -g
ALL_CFLAGS = -std=gnu11 $(WARN) $(CFLAGS) $(SANFLAGS) -D_GNU_SOURCE \
             -D_FILE_OFFSET_BITS=64 -DQCOW2FUSE_VERSION='"$(VERSION)"' \
             $(shell pkg-config --cflags $(PKGS))
LIBS      := $(shell pkg-config --libs $(PKGS)) -lpthread
CHECK_LIBS = $(shell pkg-config --libs check 2>/dev/null || echo -lcheck)

LIB_SRCS  := $(filter-out src/main.c src/qcow2check.c,$(wildcard src/*.c))
LIB_OBJS  := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(LIB_SRCS))
UNIT_SRCS := $(wildcard tests/unit/check_*.c)
UNIT_BINS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRCS))
TOOL_SRCS := $(wildcard tests/tools/*.c)
TOOL_BINS := $(patsubst tests/tools/%.c,$(BUILD)/tests/%,$(TOOL_SRCS))

.PHONY: all check unit integration deps clean install uninstall demo fuzz bench
all: $(BUILD)/qcow2fuse $(BUILD)/qcow2check

$(BUILD)/obj/%.o: src/%.c $(wildcard src/*.h) | $(BUILD)/obj
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BUILD)/libqcow2fuse.a: $(LIB_OBJS)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/qcow2fuse: $(BUILD)/obj/main.o $(BUILD)/libqcow2fuse.a
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/qcow2check: $(BUILD)/obj/qcow2check.o $(BUILD)/libqcow2fuse.a
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libqcow2fuse.a $(wildcard tests/unit/*.h) | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) -iquote src -iquote tests/unit -o $@ $< $(BUILD)/libqcow2fuse.a $(CHECK_LIBS) $(LIBS)

$(BUILD)/tests/%: tests/tools/%.c $(wildcard tests/tools/*.h) $(BUILD)/libqcow2fuse.a | $(BUILD)/tests
	$(CC) $(ALL_CFLAGS) -pthread -iquote src -o $@ $< $(BUILD)/libqcow2fuse.a $(LIBS)

$(BUILD)/obj $(BUILD)/tests:
	mkdir -p $@

unit: $(UNIT_BINS)
	@failed=0; for t in $(UNIT_BINS); do echo "== $$t"; CK_FORK=yes $$t || failed=1; done; \
	exit $$failed

integration: $(BUILD)/qcow2fuse $(BUILD)/qcow2check $(TOOL_BINS)
	QCOW2FUSE=$(abspath $(BUILD)/qcow2fuse) QCOW2CHECK=$(abspath $(BUILD)/qcow2check) \
	    TOOLS=$(abspath $(BUILD)/tests) \
	    tests/integration/run.sh
	QCOW2FUSE=$(abspath $(BUILD)/qcow2fuse) QCOW2CHECK=$(abspath $(BUILD)/qcow2check) \
	    TOOLS=$(abspath $(BUILD)/tests) \
	    tests/integration/on_io_uring.sh

# make check and make demo install what is missing first (make deps), then
# build in a second make: this one's $(shell pkg-config ...) ran before the
# install, and with -j the build must not start beside apt-get.
check: deps
	@$(MAKE) --no-print-directory unit integration

demo: deps
	@$(MAKE) --no-print-directory $(BUILD)/qcow2fuse $(BUILD)/qcow2check
	QCOW2FUSE=$(abspath $(BUILD)/qcow2fuse) QCOW2CHECK=$(abspath $(BUILD)/qcow2check) \
	    scripts/demo.sh

# Benchmark against qemu-storage-daemon's FUSE export and a raw passthrough
# daemon (not a test: figures only).  BENCH_ARGS=--quick for a short run.
BENCH_ARGS ?=
$(BUILD)/bench/passthrough: bench/passthrough.c
	@mkdir -p $(@D)
	$(CC) -std=gnu11 $(WARN) -O2 -g -o $@ $< $(shell pkg-config --cflags --libs fuse3)

# The most a daemon that copies could serve 1 MiB cached reads at: pread +
# memcpy per block, no FUSE (bench/README: "the copy ceiling").
$(BUILD)/bench/copy_ceiling: bench/copy_ceiling.c
	@mkdir -p $(@D)
	$(CC) -std=gnu11 $(WARN) -O2 -g -pthread -o $@ $<

bench: $(BUILD)/qcow2fuse $(BUILD)/bench/passthrough $(BUILD)/bench/copy_ceiling
	QCOW2FUSE=$(abspath $(BUILD)/qcow2fuse) PASSTHROUGH=$(abspath $(BUILD)/bench/passthrough) \
	    bench/run.sh $(BENCH_ARGS)

# Fuzzing (clang with libFuzzer): every target for FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
FUZZ_DIR     := build/fuzz
FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,$(FUZZ_DIR)/%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -std=gnu11 -D_GNU_SOURCE \
                -D_FILE_OFFSET_BITS=64 -DQCOW2FUSE_VERSION='"$(VERSION)"' -iquote src \
                $(shell pkg-config --cflags $(PKGS))

$(FUZZ_DIR)/%: tests/fuzz/%.c $(LIB_SRCS) $(wildcard src/*.h)
	mkdir -p $(FUZZ_DIR)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< $(LIB_SRCS) $(LIBS)

fuzz: $(FUZZ_TARGETS)
	tests/fuzz/seeds.sh $(FUZZ_DIR)/seeds
	@set -e; for t in $(FUZZ_TARGETS); do \
	    mkdir -p $$t.corpus; echo "== $$t for $(FUZZ_SECONDS) s"; \
	    $$t -max_total_time=$(FUZZ_SECONDS) -max_len=4194304 -rss_limit_mb=2048 \
	        -timeout=10 -print_final_stats=1 $$t.corpus $(FUZZ_DIR)/seeds; done

# The Debian packages of the build, make check and make demo.  make deps
# installs the missing ones and is a no-op (one dpkg-query) when all are
# there; DEPS_PKGS=... replaces the list.
DEPS_PKGS ?= gcc libc6-dev pkg-config libfuse3-dev fuse3 zlib1g-dev libzstd-dev liburing-dev check \
             qemu-utils qemu-system-common e2fsprogs xfsprogs btrfs-progs dosfstools mtools fio attr libnbd-bin \
             fdisk gdisk psmisc passwd
deps:
	@scripts/deps.sh $(DEPS_PKGS)

# What make install puts in place, and make uninstall removes again.
INSTALL_BINS := qcow2fuse qcow2check
INSTALL_MANS := $(notdir $(wildcard man/*.1))

install: $(addprefix $(BUILD)/,$(INSTALL_BINS))
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 0755 $(addprefix $(BUILD)/,$(INSTALL_BINS)) $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(addprefix man/,$(INSTALL_MANS)) $(DESTDIR)$(PREFIX)/share/man/man1/

# Only our files: the directories are shared with everything else there.
uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,$(INSTALL_BINS))
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/share/man/man1/,$(INSTALL_MANS))

clean:
	rm -rf build
