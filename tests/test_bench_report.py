"""bench/_report.py: the machine line names the CPU's generation and vector units, so figures from two
hosts with one model name (both 'AMD EPYC') are not confused; sections are replaced in place."""
import platform

from bench import _report

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: something else
"""
ZEN5 = """processor\t: 0
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx fma avx2 avx512f avx512dq avx512_bf16 avx512_vnni
"""
XEON = """processor\t: 0
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_names_generation_and_vector_units():
  assert _report._cpu(ZEN3) == "AMD EPYC (family 25 model 1, AVX2)"
  assert _report._cpu(ZEN5) == "AMD EPYC (family 26 model 2, AVX-512, AVX512_BF16)"
  assert _report._cpu(XEON) == "Intel(R) Xeon(R) Processor (family 6 model 143, AVX-512, AMX, AVX512_BF16)"


def test_cpu_without_details_is_the_name_alone():
  assert _report._cpu("model name\t: Some CPU\n") == "Some CPU"
  assert _report._cpu("") == (platform.processor() or platform.machine())  # no /proc/cpuinfo


def test_machine_description_reads_this_host():
  line = _report.machine_description()
  assert " cores, " in line and "; JAX devices: " in line and "; numpy " in line


def test_write_section_replaces_only_its_own(tmp_path):
  path = tmp_path / "B.md"
  path.write_text("# Benchmarks\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\n<!-- b:begin -->\nb\n"
                  "<!-- b:end -->\n")
  _report.write_section("a", "new a", str(path))
  _report.write_section("c", "c", str(path))
  assert path.read_text() == ("# Benchmarks\n\n<!-- a:begin -->\nnew a\n<!-- a:end -->\n\n"
                              "<!-- b:begin -->\nb\n<!-- b:end -->\n\n<!-- c:begin -->\nc\n<!-- c:end -->\n")
