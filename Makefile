# modelprep build. Sources are found recursively so that adding a file (or a
# module folder) under server/ handlers/ store/ loader/ gpu/ util/ needs no
# edit here.
#
#   make            release build: build/modelprepd, the client build/modelprep
#                   and build/modelprep-* tools
#   make run        install the build deps, build, start the server on its defaults
#   make test       install the build and test deps, build under ASan+UBSan, run every suite
#   make bench      benchmarks under bench/ (prints ratios against peers)
#   make deps       only the build deps (scripts/deps.sh run): no Python, no PyPI
#   make deps-test  make deps + the test tools and .venv (scripts/deps.sh test)
#   make cuda       build build/cuda/modelprepd with the CUDA backend (nvcc)
#   make fuzz       libFuzzer targets (clang) under build/fuzz/
#
# BUILD=dir puts all outputs elsewhere (parallel checkouts, helpers).

BUILD   ?= build
CC      ?= cc
PKGS    := libmicrohttpd jansson libcurl sqlite3 openssl hiredis
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
GIT_REV := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
VERSION := 0.1.0

WARN    := -std=c11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wno-format-truncation
DEFS    := -D_GNU_SOURCE -DMP_VERSION=\"$(VERSION)\" -DMP_GIT=\"$(GIT_REV)\"
CFLAGS_COMMON := $(WARN) $(DEFS) -I. $(PKG_CFLAGS) -pthread -MMD -MP
OPT_FLAGS := -O2 -g
SAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDLIBS_ALL := $(PKG_LIBS) -lm -pthread -ldl

CORE_DIRS := util store loader gpu handlers server
CORE_SRC  := $(filter-out server/main.c,$(sort $(shell find $(CORE_DIRS) -name '*.c')))
WEB_ASSETS := $(wildcard web/*)
TOOL_SRC  := $(wildcard tools/*.c)
# The client's parts (tools/cli/): linked into build/modelprep only.
CLI_SRC   := $(wildcard tools/cli/*.c)
UNIT_SRC  := $(wildcard tests/unit/test_*.c)
INTEG_SRC := $(wildcard tests/integration/test_*.c)
INTEG_LIB := $(filter-out $(INTEG_SRC),$(wildcard tests/integration/*.c))
HELPER_SRC := $(wildcard tests/helpers/*.c)

# Release tree
REL := $(BUILD)
REL_OBJ := $(patsubst %.c,$(REL)/obj/%.o,$(CORE_SRC))
REL_LIB := $(REL)/libmodelprep.a
REL_TOOLS := $(patsubst tools/%.c,$(REL)/%,$(TOOL_SRC))

# Sanitized tree (tests)
SAN := $(BUILD)/asan
SAN_OBJ := $(patsubst %.c,$(SAN)/obj/%.o,$(CORE_SRC))
SAN_LIB := $(SAN)/libmodelprep.a
SAN_TOOLS := $(patsubst tools/%.c,$(SAN)/%,$(TOOL_SRC))
UNIT_BIN := $(patsubst tests/unit/%.c,$(SAN)/tests/unit/%,$(UNIT_SRC))
INTEG_BIN := $(patsubst tests/integration/%.c,$(SAN)/tests/integration/%,$(INTEG_SRC))
HELPER_BIN := $(patsubst tests/helpers/%.c,$(SAN)/tests/helpers/%,$(HELPER_SRC))

VENV := .venv
PY := $(VENV)/bin/python

# Keep intermediate objects (tests, tools) so relinking needs no recompiling.
.SECONDARY:

.PHONY: all run test test-build layers unit integration pytest bench cuda fuzz deps deps-test deps-bench clean format cuda-check
all: $(REL)/modelprepd $(REL_TOOLS)

# What `make run` needs is only what building and running need; the test
# tools (and PyPI) come with `make test`. See scripts/deps.sh.
deps:
	@bash scripts/deps.sh run

deps-test:
	@bash scripts/deps.sh test

deps-bench:
	@bash scripts/deps.sh bench

run: deps all
	$(REL)/modelprepd $(ARGS)

# --- embedded web assets (dashboard, openapi) ---------------------------------
$(REL)/gen/assets.c $(SAN)/gen/assets.c: scripts/embed.sh $(WEB_ASSETS) openapi/openapi.yaml
	@mkdir -p $(dir $@)
	bash scripts/embed.sh $@ $(WEB_ASSETS) openapi/openapi.yaml

# --- release -----------------------------------------------------------------
$(REL)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) $(CFLAGS_COMMON) $(OPT_FLAGS) -c $< -o $@

$(REL)/obj/gen/assets.o: $(REL)/gen/assets.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) $(CFLAGS_COMMON) $(OPT_FLAGS) -c $< -o $@

$(REL_LIB): $(REL_OBJ) $(REL)/obj/gen/assets.o
	@rm -f $@
	@ar rcs $@ $^

$(REL)/modelprepd: $(REL)/obj/server/main.o $(REL_LIB)
	@echo "  LD      $@"
	@$(CC) $(OPT_FLAGS) -o $@ $^ $(LDLIBS_ALL)

$(REL)/%: $(REL)/obj/tools/%.o $(REL_LIB)
	@echo "  LD      $@"
	@$(CC) $(OPT_FLAGS) -o $@ $^ $(LDLIBS_ALL)

$(REL)/modelprep: $(REL)/obj/tools/modelprep.o $(patsubst %.c,$(REL)/obj/%.o,$(CLI_SRC)) $(REL_LIB)
	@echo "  LD      $@"
	@$(CC) $(OPT_FLAGS) -o $@ $^ $(LDLIBS_ALL)

# --- sanitized ---------------------------------------------------------------
$(SAN)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC/SAN  $<"
	@$(CC) $(CFLAGS_COMMON) $(SAN_FLAGS) -c $< -o $@

$(SAN)/obj/gen/assets.o: $(SAN)/gen/assets.c
	@mkdir -p $(dir $@)
	@echo "  CC/SAN  $<"
	@$(CC) $(CFLAGS_COMMON) $(SAN_FLAGS) -c $< -o $@

$(SAN_LIB): $(SAN_OBJ) $(SAN)/obj/gen/assets.o
	@rm -f $@
	@ar rcs $@ $^

$(SAN)/modelprepd: $(SAN)/obj/server/main.o $(SAN_LIB)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL)

$(SAN)/modelprep-%: $(SAN)/obj/tools/modelprep-%.o $(SAN_LIB)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL)

$(SAN)/modelprep: $(SAN)/obj/tools/modelprep.o $(patsubst %.c,$(SAN)/obj/%.o,$(CLI_SRC)) $(SAN_LIB)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL)

$(SAN)/tests/unit/%: $(SAN)/obj/tests/unit/%.o $(SAN_LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL) -lcmocka

# The client's parser is tested on its own: its object is not in the library.
$(SAN)/tests/unit/test_cli_sse: $(SAN)/obj/tests/unit/test_cli_sse.o $(SAN)/obj/tools/cli/sse.o $(SAN_LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL) -lcmocka

$(SAN)/tests/integration/%: $(SAN)/obj/tests/integration/%.o $(patsubst %.c,$(SAN)/obj/%.o,$(INTEG_LIB)) $(SAN_LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL) -lcmocka

$(SAN)/tests/helpers/%: $(SAN)/obj/tests/helpers/%.o $(SAN_LIB)
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) $(SAN_FLAGS) -o $@ $^ $(LDLIBS_ALL)

test-build: $(SAN)/modelprepd $(SAN_TOOLS) $(UNIT_BIN) $(INTEG_BIN) $(HELPER_BIN) $(REL)/modelprepd $(REL_TOOLS)

# make test: the whole suite. Each stage prints its own closing line.
test: deps-test
	@$(MAKE) --no-print-directory test-build
	@$(MAKE) --no-print-directory cuda-check
	@BUILD=$(BUILD) bash scripts/run-tests.sh

layers:
	@python3 scripts/check_layers.py

unit: test-build
	@BUILD=$(BUILD) bash scripts/run-tests.sh unit

integration: test-build
	@BUILD=$(BUILD) bash scripts/run-tests.sh integration

pytest: test-build
	@BUILD=$(BUILD) bash scripts/run-tests.sh py

# --- CUDA backend --------------------------------------------------------------
# Core C sources again with -DMP_HAVE_CUDA=1, gpu/*.cu with nvcc, cudart linked
# statically so the binary needs only the driver (libcuda, dlopen'ed by cudart;
# without one it runs on the host backend). tests/cuda/* are built here only
# and run only on a GPU machine (scripts/gpu-check.sh).
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(shell command -v nvcc 2>/dev/null || echo $(CUDA_HOME)/bin/nvcc)
CU_SRC := $(sort $(shell find gpu -name '*.cu'))
CUDA_DIR := $(BUILD)/cuda
CUDA_OBJ := $(patsubst %.c,$(CUDA_DIR)/obj/%.o,$(CORE_SRC)) $(patsubst %.cu,$(CUDA_DIR)/obj/%.cu.o,$(CU_SRC))
CUDA_ARCHS ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
NVCC_FLAGS ?= -O2 -std=c++17 -Xcompiler -fPIC,-Wall -I. $(CUDA_ARCHS)
CUDA_TEST_SRC := $(wildcard tests/cuda/*.c)
CUDA_TEST_BIN := $(patsubst tests/cuda/%.c,$(CUDA_DIR)/tests/cuda/%,$(CUDA_TEST_SRC))

$(CUDA_DIR)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC/CUDA $<"
	@$(CC) $(CFLAGS_COMMON) $(OPT_FLAGS) -DMP_HAVE_CUDA=1 -isystem $(CUDA_HOME)/include -c $< -o $@

$(CUDA_DIR)/obj/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	@echo "  NVCC    $<"
	@$(NVCC) $(NVCC_FLAGS) -DMP_HAVE_CUDA=1 -MMD -MP -MF $(@:.o=.d) -c $< -o $@

$(CUDA_DIR)/obj/gen/assets.o: $(REL)/gen/assets.c
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	@$(CC) $(CFLAGS_COMMON) $(OPT_FLAGS) -c $< -o $@

$(CUDA_DIR)/libmodelprep.a: $(CUDA_OBJ) $(CUDA_DIR)/obj/gen/assets.o
	@rm -f $@
	@ar rcs $@ $^

CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -lrt -ldl -lpthread -lstdc++
$(CUDA_DIR)/modelprepd: $(CUDA_DIR)/obj/server/main.o $(CUDA_DIR)/libmodelprep.a
	@echo "  LD      $@"
	@$(CC) -o $@ $^ $(LDLIBS_ALL) $(CUDA_LIBS)

$(CUDA_DIR)/tests/cuda/%: $(CUDA_DIR)/obj/tests/cuda/%.o $(CUDA_DIR)/libmodelprep.a
	@mkdir -p $(dir $@)
	@echo "  LD      $@"
	@$(CC) -o $@ $^ $(LDLIBS_ALL) $(CUDA_LIBS) -lcmocka

$(CUDA_DIR)/%: $(CUDA_DIR)/obj/tools/%.o $(CUDA_DIR)/libmodelprep.a
	@echo "  LD      $@"
	@$(CC) -o $@ $^ $(LDLIBS_ALL) $(CUDA_LIBS)

# The client (tools/modelprep.c) speaks only HTTP: no CUDA build of it.
cuda: $(CUDA_DIR)/modelprepd $(patsubst tools/%.c,$(CUDA_DIR)/%,$(filter-out tools/modelprep.c,$(TOOL_SRC))) $(CUDA_TEST_BIN)

# Builds and links the CUDA backend when nvcc exists (no GPU needed to link).
cuda-check:
	@if command -v nvcc >/dev/null 2>&1 || [ -x $(CUDA_HOME)/bin/nvcc ]; then \
	  $(MAKE) --no-print-directory cuda && echo "cuda build: ok"; \
	else echo "cuda build: skipped (no nvcc)"; fi

bench: deps-bench all
	@BUILD=$(BUILD) bash bench/run.sh

fuzz:
	@BUILD=$(BUILD) bash scripts/fuzz.sh build

format:
	clang-format -i $$(git ls-files '*.c' '*.h' '*.cu')

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
