"""MAE linear probing on SLURM: every flag of main_linprobe.py plus the SLURM ones (util/launcher.py).

    python submitit_linprobe.py --nodes 2 --ngpus 8 --partition PART --job_dir jobs/linprobe_base \
        --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth --data_path /path/to/imagenet \
        --batch_size 512 --blr 0.1 --weight_decay 0.0 --epochs 90 --dist_eval

The job requeues itself on preemption and at its time limit; ``--dry_run`` prints the sbatch parameters."""
from util.launcher import launch

if __name__ == "__main__":
    launch("main_linprobe")
