"""Figure: LoRA-apply cost per token, by variant, for each model x phase (from kernels/bench.py's CSV)."""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ORDER = ["no_lora", "loop", "bmm_hooks", "peft_lora", "cpu_fused", "cpu_fused_bf16", "triton", "triton_bf16"]


def plot(csv_paths: list[str], pdf: str, png: str, provenance: str) -> None:
    df = pd.concat([pd.read_csv(p) for p in csv_paths], ignore_index=True)
    panels = df.groupby(["device", "model", "phase"], sort=False)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, ((device, model, phase), d) in zip(axes[0], panels):
        table = d.pivot_table(index="proj", columns="variant", values="us_per_token", sort=False)
        table = table[[v for v in ORDER if v in table.columns]]
        table.plot.bar(ax=ax, logy=True, width=0.8, rot=30, legend=False)
        ax.set_title(f"{model} {phase} ({device}, B={d['batch'].iloc[0]}, T={d['tokens'].iloc[0]})", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("microseconds per token")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("Linear + per-row LoRA (2 senders x rank 4): time per token, min over interleaved repeats", fontsize=10)
    fig.text(0.005, 0.005, provenance, fontsize=5, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(pdf, metadata={"Subject": provenance})
    fig.savefig(png, dpi=130, metadata={"Description": provenance})


if __name__ == "__main__" and "snakemake" not in globals():
    plot(sys.argv[3:], sys.argv[1], sys.argv[2], "workflow/scripts/plot_kernel_bench.py " + " ".join(sys.argv[3:]))
elif "snakemake" in globals():
    sm = snakemake  # noqa: F821
    plot(list(sm.input.csv), sm.output.pdf, sm.output.png,
         f"rule {sm.rule}; inputs {', '.join(sm.input.csv)}")
