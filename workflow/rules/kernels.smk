# LoRA-apply kernel benchmark and its figure (on demand: `snakemake paper/figures/kernel_bench.pdf`).
# The CSVs live in results/reference/ (committed); rerun `snakemake --forcerun bench_kernels ...`
# on a machine to re-measure it.


rule bench_kernels:
    output:
        csv="results/reference/bench_kernels_{device}.csv",
    log:
        "logs/bench_kernels_{device}.log",
    benchmark:
        "benchmarks/bench_kernels_{device}.tsv"
    wildcard_constraints:
        device="cpu|cuda",
    threads: 2
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow_kernels.bench --out {output.csv} > {log} 2>&1"


rule bench_decode:
    output:
        csv="results/reference/bench_decode_{device}.csv",
        steps="results/reference/bench_decode_{device}_steps.csv",
        summary="results/reference/bench_decode_{device}.json",
    log:
        "logs/bench_decode_{device}.log",
    benchmark:
        "benchmarks/bench_decode_{device}.tsv"
    wildcard_constraints:
        device="cpu|cuda",
    threads: 2
    conda:
        "../../environment.yml"
    shell:
        "python -m tflow.bench_decode --out {output.csv} > {log} 2>&1"


rule plot_kernel_bench:
    input:
        csv=kernel_bench_csvs(),
    output:
        pdf="paper/figures/kernel_bench.pdf",
        png="paper/figures/kernel_bench.png",
    log:
        "logs/plot_kernel_bench.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/plot_kernel_bench.py"
